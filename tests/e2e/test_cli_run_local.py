"""`dreambooth run --local` with the real trainer subprocess: a bad photo is a one-line input error, Ctrl-C
stops at a checkpoint that the same command resumes from, and so does SIGTERM to the CLI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from PIL import Image

from dreambooth_cli.errors import ExitStatus
from dreambooth_cli.events import parse_line
from dreambooth_cli.report import load_run
from tests.infra.paths import ROOT

DREAMBOOTH = str(Path(sys.executable).parent / "dreambooth")


def job_file(tmp_path: Path, max_steps: int) -> Path:
    job = yaml.safe_load((ROOT / "examples" / "demo-job.yaml").read_text())
    training = job["spec"]["training"]
    training["maxSteps"] = max_steps
    training["validation"] = {"prompts": []}
    training["checkpoint"] = {"intervalSteps": None, "intervalSeconds": None, "keep": 1}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def photos(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 120, 200)).save(folder / f"p{i}.png")
    return folder


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "WORLD_SIZE", "MASTER_"))}


def test_an_undecodable_photo_is_a_one_line_input_error(tmp_path: Path) -> None:
    folder = photos(tmp_path / "photos")
    (folder / "broken.png").write_bytes(b"not an image at all")
    result = subprocess.run(
        [
            DREAMBOOTH,
            "run",
            str(job_file(tmp_path, 5)),
            "--local",
            "--workdir",
            str(tmp_path / "w"),
            "--images",
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=clean_env(),
    )
    assert result.returncode == ExitStatus.INVALID_INPUT, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: invalid job (checked by the trainer): ")
    assert "broken.png" in last
    assert "Traceback" not in result.stderr


def test_interrupt_checkpoints_and_the_same_command_resumes(tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    argv = [DREAMBOOTH, "run", str(job_file(tmp_path, 30)), "--local", "--workdir", str(workdir)]
    argv += ["--images", str(photos(tmp_path / "photos"))]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(first.stderr or []), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any(re.match(r"step \d+/30", line) for line in list(lines)):
        assert first.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "no progress line"
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)  # as Ctrl-C: the CLI forwards SIGTERM to the trainer
    first.wait(timeout=300)
    reader.join(timeout=10)
    assert first.returncode == ExitStatus.JOB_FAILED, "".join(lines)
    assert "run the same command to resume" in lines[-1]

    output = workdir / "s3" / "demo" / "models" / "demo-toy"
    checkpoints = sorted((output / "checkpoints").glob("step-*/manifest.json"))
    assert len(checkpoints) == 1, "the preempted trainer writes one checkpoint"
    stopped_at = int(checkpoints[0].parent.name.removeprefix("step-"))
    assert 0 < stopped_at < 30

    second = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, env=clean_env())
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(rf"resumed .*step={stopped_at}\b", second.stderr), second.stderr[-3000:]
    assert "images: 0 copied, 3 already there" in second.stderr
    run = load_run(output)
    assert run.metrics[-1].step == 30
    assert run.result["status"] == "succeeded"


class StderrLines:
    """A subprocess's stderr, read line by line in a thread; `wait_for` blocks until a line matches."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._pattern: re.Pattern[str] | None = None
        self._seen = threading.Event()
        self._lock = threading.Lock()
        self._process = process
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            with self._lock:
                self.lines.append(line)
                if self._pattern is not None and self._pattern.match(line):
                    self._seen.set()
        self._seen.set()  # EOF: wait_for returns, and the caller sees no match

    def wait_for(self, pattern: str, timeout: float) -> bool:
        with self._lock:
            self._pattern = re.compile(pattern)
            if any(self._pattern.match(line) for line in self.lines):
                return True
        self._seen.wait(timeout)
        with self._lock:
            return any(self._pattern.match(line) for line in self.lines)

    def join(self) -> str:
        self._reader.join(timeout=30)
        return "".join(self.lines)


def test_sigterm_to_the_cli_stops_the_trainer_at_a_checkpoint(tmp_path: Path) -> None:
    """As `timeout` or a CI cancel does: the trainer gets SIGTERM, writes its checkpoint, result and termination
    message, and its output is read to the end (no BrokenPipeError)."""
    workdir = tmp_path / "w"
    argv = [DREAMBOOTH, "run", str(job_file(tmp_path, 400)), "--local", "--workdir", str(workdir)]
    argv += ["--images", str(photos(tmp_path / "photos"))]
    cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    stderr = StderrLines(cli)
    try:
        assert stderr.wait_for(r"step \d+/400", timeout=300), "".join(stderr.lines)
        cli.send_signal(signal.SIGTERM)
        cli.wait(timeout=300)
    finally:
        cli.kill()
    text = stderr.join()
    assert cli.returncode == ExitStatus.JOB_FAILED, text
    assert "SIGTERM: the trainer is writing a checkpoint" in text
    assert "run the same command to resume" in text.strip().splitlines()[-1]

    output = workdir / "s3" / "demo" / "models" / "demo-toy"
    checkpoints = sorted((output / "checkpoints").glob("step-*/manifest.json"))
    assert len(checkpoints) == 1, "the stopped trainer writes one checkpoint"
    assert 0 < int(checkpoints[0].parent.name.removeprefix("step-")) < 400
    assert json.loads((workdir / "termination-log").read_text())["status"] == "preempted"
    log = (workdir / "train.log").read_text()
    assert "BrokenPipeError" not in log
    finished = [e for e in map(parse_line, log.splitlines()) if e and e.get("event") == "finished"]
    assert [e["status"] for e in finished] == ["preempted"]
    assert load_run(output).result["status"] == "preempted"

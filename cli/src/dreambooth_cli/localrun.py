"""`dreambooth run JOB.yaml --local`: the same job YAML, without a cluster.

The trainer runs as a subprocess (`dreambooth-train`; the CLI never imports the trainer package). s3:// URIs are
rewritten to file://<workdir>/s3/<bucket>/<key>, so outputs, checkpoints and the class-image cache land in the
workdir, and re-running the same command resumes from the newest checkpoint there.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TextIO
from urllib.parse import unquote, urlparse

from dreambooth_api import env as trainer_env
from dreambooth_api.exitcodes import ExitCode
from dreambooth_api.progress import TrainerPhase
from dreambooth_api.trainer_config import build_trainer_config
from dreambooth_cli.display import ProgressDisplay
from dreambooth_cli.errors import CliError, ExitStatus, InputError
from dreambooth_cli.events import Progress, describe_event, evaluation_note, is_notable, parse_line
from dreambooth_cli.report.data import read_json

TRAINER_COMMAND = "dreambooth-train"
RUN_RECORD = "run.json"
"""Written into the workdir: where the outputs of the local run are (so `dreambooth report DIR` finds them)."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TRAINER_GRACE_DEFAULT_SECONDS = 25.0  # the trainer's DREAMBOOTH_GRACE_SECONDS default (docs/contracts.md)
TERMINATION_MESSAGE_ENV = "TERMINATION_MESSAGE_PATH"  # where the trainer writes its termination message
STOP_MARGIN_SECONDS = 30.0
"""After forwarding SIGTERM, the trainer is killed if it still runs this long after its own grace period."""


def to_local_uri(uri: str, workdir: Path) -> str:
    """s3://bucket/key -> file://<workdir>/s3/bucket/key; other URIs unchanged.

    A key with a `..` or `.` segment (a literal name in S3, a parent directory on a disk) is refused: the local path
    must stay inside `<workdir>/s3`, whatever the job says.
    """
    if not uri.startswith("s3://"):
        return uri
    parts = [part for part in uri.removeprefix("s3://").split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise InputError(f"{uri}: a '.' or '..' segment cannot be mapped into the local workdir")
    root = (workdir.resolve() / "s3").resolve()
    local = root.joinpath(*parts).resolve()
    if not local.is_relative_to(root):  # a symlink inside the workdir pointing elsewhere
        raise InputError(f"{uri}: maps outside the local workdir ({local})")
    return local.as_uri()


def localize(value: Any, workdir: Path) -> Any:
    """A copy of a JSON-like value with every s3:// string rewritten for the workdir."""
    if isinstance(value, dict):
        return {k: localize(v, workdir) for k, v in value.items()}
    if isinstance(value, list):
        return [localize(v, workdir) for v in value]
    if isinstance(value, str):
        return to_local_uri(value, workdir)
    return value


def uri_to_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise CliError(f"{uri}: not a local file:// URI")
    return Path(unquote(parsed.path))


def prepare_local_job(job: dict[str, Any], workdir: Path, *, tiny: bool) -> dict[str, Any]:
    """The job as it runs locally: storage rewritten to the workdir, the tiny model when asked or unnamed."""
    local = copy.deepcopy(job)
    spec = localize(local.get("spec", {}), workdir)
    spec.pop("storage", None)  # endpoint and credentials are for S3; everything is file:// now
    if tiny or not spec.get("baseModel"):
        spec["baseModel"] = {"tiny": True}
    local["spec"] = spec
    return local


def local_trainer_config(job: dict[str, Any], workdir: Path, *, tiny: bool) -> dict[str, Any]:
    return build_trainer_config(prepare_local_job(job, workdir, tiny=tiny))


def instance_images_dir(config: dict[str, Any]) -> Path:
    images = config.get("instanceImages", {})
    uri = images.get("uri") if isinstance(images, dict) else None
    if not isinstance(uri, str):
        raise InputError("--images needs spec.instanceImages.uri (a prefix), not a list of files")
    return uri_to_path(uri)


def trainer_command() -> list[str]:
    """`dreambooth-train` next to this Python (the venv), else from PATH."""
    beside = Path(sys.executable).parent / TRAINER_COMMAND
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(TRAINER_COMMAND)
    if found is None:
        raise CliError(f"{TRAINER_COMMAND} not found: install the dreambooth-trainer package (make install)")
    return [found]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class LocalRun:
    workdir: Path
    config: dict[str, Any]
    exit_code: int
    termination: dict[str, Any]

    @property
    def output_dir(self) -> Path:
        return uri_to_path(str(self.config["output"]["uri"]))

    @property
    def log_path(self) -> Path:
        return self.workdir / "train.log"


def thread_env(config: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """CPU threads for the trainer: one for the tiny model unless OMP_NUM_THREADS is set.

    The tiny model gains nothing from more threads, and on a busy machine OpenMP threads that wait for each
    other make a step many times slower (measured: 80 steps took 36 s with one thread and 429 s with two on a
    shared 2-core machine).
    """
    tiny = bool(config.get("baseModel", {}).get("tiny"))
    if tiny and "OMP_NUM_THREADS" not in environ:
        return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return {}


def stop_grace_seconds(environ: Mapping[str, str]) -> float:
    """How long a stopping trainer may take: its DREAMBOOTH_GRACE_SECONDS plus a margin."""
    try:
        grace = float(environ.get(trainer_env.GRACE_SECONDS, TRAINER_GRACE_DEFAULT_SECONDS))
    except ValueError:
        grace = TRAINER_GRACE_DEFAULT_SECONDS
    return max(grace, 0.0) + STOP_MARGIN_SECONDS


class Stopper:
    """While the trainer runs, SIGINT, SIGTERM and SIGHUP to us send it one SIGTERM (it checkpoints and exits).

    Later signals are ignored; the trainer is killed if it still runs `grace_seconds` after the first. Handlers
    are installed only in the main thread, and the previous ones are restored on exit.
    """

    def __init__(self, process: subprocess.Popen[str], grace_seconds: float) -> None:
        self.process = process
        self.grace_seconds = grace_seconds
        self.signum: int | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> Stopper:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            self.stop()

    def stop(self) -> None:
        """Send SIGTERM to the trainer and start the grace timer."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self._timer = threading.Timer(self.grace_seconds, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


def stop_note(signum: int) -> str:
    return f"{signal.Signals(signum).name}: the trainer is writing a checkpoint; run the same command again to resume"


def run_trainer(config: dict[str, Any], workdir: Path, display: ProgressDisplay) -> LocalRun:
    """Run the trainer to its end, feeding the display.

    Ctrl-C, SIGTERM and SIGHUP send it SIGTERM so that it checkpoints first; its output is read to its end.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    termination_path = workdir / "termination-log"
    termination_path.unlink(missing_ok=True)
    config_path = workdir / "job.json"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (workdir / RUN_RECORD).write_text(
        json.dumps({"outputUri": config["output"]["uri"], "config": str(config_path)}, indent=2) + "\n"
    )
    env = {
        **os.environ,
        trainer_env.CONFIG: str(config_path.resolve()),
        trainer_env.WORKDIR: str(scratch.resolve()),
        TERMINATION_MESSAGE_ENV: str(termination_path.resolve()),
        trainer_env.BIND_ADDRESS: "127.0.0.1",
        trainer_env.METRICS_PORT: str(free_port()),
        "PYTHONUNBUFFERED": "1",
        **thread_env(config, dict(os.environ)),
    }
    with (workdir / "train.log").open("a", encoding="utf-8") as log:
        process = subprocess.Popen(
            [*trainer_command(), "--local"],  # one process, ignore PET_*/WORLD_SIZE from the environment
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
            start_new_session=True,  # signals to our process group reach only us; Stopper forwards SIGTERM
        )
        with Stopper(process, stop_grace_seconds(env)) as stopper:
            exit_code = _follow(process, log, display, stopper)
    termination = read_json(termination_path)
    return LocalRun(workdir, config, exit_code, termination)


def _follow(process: subprocess.Popen[str], log: TextIO, display: ProgressDisplay, stopper: Stopper) -> int:
    """Copy the trainer's stdout to the log and the display until it closes; returns the exit code."""
    assert process.stdout is not None
    progress = Progress()
    noted = False
    for line in process.stdout:
        log.write(line)
        if stopper.signum is not None and not noted:
            display.note(stop_note(stopper.signum))
            noted = True
        event = parse_line(line)
        if event is None:
            continue
        evaluating = evaluation_note(event)
        if progress.update(event):
            display.update(progress)
        elif evaluating is not None:
            if progress.phase != TrainerPhase.EVALUATING:
                progress.phase = TrainerPhase.EVALUATING  # the bar's title, after the last step
                display.update(progress, force=True)
            if evaluating:
                display.note(evaluating)
        elif is_notable(event):
            display.note(describe_event(event))
    exit_code = process.wait()
    if stopper.signum is not None and not noted:
        display.note(stop_note(stopper.signum))
    display.update(progress, force=True)
    return exit_code


def check_outcome(run: LocalRun) -> None:
    """Raise a one-line CliError unless the trainer succeeded."""
    if run.exit_code == 0:
        return
    message = str(run.termination.get("message") or "")
    reason = str(run.termination.get("reason") or "")
    if not message:
        tail = [ln.strip() for ln in run.log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        message = tail[0] if tail else "no message"
    if run.exit_code == ExitCode.INVALID_INPUT:
        raise CliError(f"invalid job (checked by the trainer): {message}", ExitStatus.INVALID_INPUT)
    if run.exit_code == ExitCode.PREEMPTED:
        raise CliError(
            f"training stopped at a checkpoint ({message or 'preempted'}); run the same command to resume",
            ExitStatus.JOB_FAILED,
        )
    label = f", {reason}" if reason else ""
    raise CliError(
        f"training failed (exit {run.exit_code}{label}): {message} (log: {run.log_path})", ExitStatus.JOB_FAILED
    )


def output_dir_of(path: Path) -> Path:
    """A run's output folder from a workdir (its run.json) or the output folder itself."""
    record = read_json(path / RUN_RECORD)
    uri = record.get("outputUri")
    if isinstance(uri, str):
        return uri_to_path(uri)
    return path


EVALUATE_MODULE = "dreambooth_trainer.evaluation.rerun"


def evaluate_run(output: Path) -> dict[str, Any]:
    """Evaluate a finished run's output folder again (the trainer's `evaluation.rerun`, in the trainer's Python);
    returns the fields it printed (evaluation, evaluationUri, qualityGate, qualityGateReason)."""
    python = Path(trainer_command()[0]).parent / "python"
    command = [str(python) if python.is_file() else sys.executable, "-m", EVALUATE_MODULE, str(output.resolve())]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    try:
        fields: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        fields = {}
    if proc.returncode == 10:
        raise InputError(str(fields.get("error") or proc.stderr.strip()[-500:]))
    if proc.returncode != 0:
        detail = fields.get("evaluationError") or proc.stderr.strip()[-500:] or f"exit {proc.returncode}"
        raise CliError(f"the evaluation failed: {detail}", ExitStatus.JOB_FAILED)
    return fields

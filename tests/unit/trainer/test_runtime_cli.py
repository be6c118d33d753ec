"""`dreambooth-train` as a subprocess: exit codes and the termination message for bad input; error mapping; the
exit at the end of the grace period when an abandoned upload would keep the process alive; SIGTERM before training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from PIL import Image

from dreambooth_api.config import ConfigError
from dreambooth_api.exitcodes import ExitCode, InvalidInputError, RetryableError
from dreambooth_trainer.cli import classify

TRAINER = str(Path(sys.executable).parent / "dreambooth-train")


def _run(tmp_path: Path, config: dict[str, Any] | str) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    path = tmp_path / "job.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    term = tmp_path / "termination-log"
    env = {
        **os.environ,
        "TERMINATION_MESSAGE_PATH": str(term),
        "DREAMBOOTH_WORKDIR": str(tmp_path / "work"),
        "DREAMBOOTH_METRICS_PORT": "0",
    }
    proc = subprocess.run(
        [TRAINER, "--config", str(path), "--local"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return proc.returncode, json.loads(term.read_text()), events


def test_invalid_config_exits_10_with_every_field_named(tmp_path: Path) -> None:
    code, term, events = _run(
        tmp_path,
        {"instanceImages": {"prompt": ""}, "output": {"uri": "ftp://x"}, "training": {"maxSteps": 0}},
    )
    assert code == ExitCode.INVALID_INPUT
    assert term["status"] == "failed"
    assert term["reason"] == "InvalidInput"
    for field in ("instanceImages.prompt", "output.uri", "training.maxSteps"):
        assert field in term["message"]
    assert events[-1]["event"] == "failed"
    assert events[-1]["exitCode"] == 10


def test_missing_instance_images_exit_10_and_result_json(tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = {
        "instanceImages": {"uri": f"file://{tmp_path}/nothing-here", "prompt": "a sks dog"},
        "training": {"maxSteps": 2, "resolution": 32},
        "output": {"uri": f"file://{out}", "formats": ["lora"]},
    }
    code, term, _ = _run(tmp_path, config)
    assert code == ExitCode.INVALID_INPUT
    assert term["reason"] == "InvalidInput"
    assert "nothing-here" in term["message"]
    assert json.loads((out / "result.json").read_text()) == term


@pytest.mark.parametrize(
    ("err", "code", "reason"),
    [
        (ConfigError("x"), ExitCode.INVALID_INPUT, "InvalidInput"),
        (InvalidInputError("x"), ExitCode.INVALID_INPUT, "InvalidInput"),
        (RetryableError("x"), ExitCode.RETRYABLE, "RetryableError"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ExitCode.RETRYABLE, "StorageUnavailable"),
        (
            RuntimeError("[../third_party/gloo/transport/tcp/pair.cc] Connection closed by peer"),
            ExitCode.RETRYABLE,
            "CollectiveFailure",
        ),
        (ValueError("a bug"), ExitCode.RETRYABLE, "TrainingError"),
    ],
)
def test_classify_maps_errors_to_exit_codes(err: BaseException, code: ExitCode, reason: str) -> None:
    assert classify(err) == (code, reason)


# A preempted process whose result is written, but whose interpreter would join a non-daemon thread forever at exit
# (as it joins boto3's transfer threads of an abandoned upload).
_BLOCKED_EXIT = """
import sys, threading
from dreambooth_trainer.preemption import Preemption
p = Preemption(grace=1.0)
p.trigger("SIGTERM")
p.exit_at_grace_end(12)
threading.Thread(target=threading.Event().wait, name="transfer").start()
print("result written", flush=True)
sys.exit(0)
"""


def test_exit_at_grace_end_ends_a_blocked_exit_with_12() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_EXIT], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == ExitCode.PREEMPTED, proc.stderr
    assert proc.stdout == "result written\n"


def test_sigterm_while_generating_class_images_exits_12_and_keeps_them(tmp_path: Path) -> None:
    """A preemption before training stops at the next class-image batch (no SIGKILL at the end of the grace period),
    and the images made so far are cached for the next attempt."""
    images = tmp_path / "in"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (60 * i, 120, 200)).save(images / f"{i}.png")
    cache = tmp_path / "class-cache"
    config = {
        "instanceImages": {"uri": images.as_uri(), "prompt": "a sks dog"},
        "priorPreservation": {
            "enabled": True,
            "classPrompt": "a dog",
            "numImages": 10000,
            "steps": 2,
            "cacheUri": cache.as_uri(),
        },
        "training": {"maxSteps": 2, "resolution": 32},
        "output": {"uri": (tmp_path / "out").as_uri(), "formats": ["lora"]},
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    term = tmp_path / "termination-log"
    env = {**os.environ, "TERMINATION_MESSAGE_PATH": str(term), "DREAMBOOTH_WORKDIR": str(tmp_path / "work"),
           "DREAMBOOTH_METRICS_PORT": "0"}  # fmt: skip
    proc = subprocess.Popen(
        [TRAINER, "--config", str(path), "--local"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:  # readiness from the trainer's own log, not a sleep
            if line.startswith("{") and json.loads(line).get("phase") == "GeneratingPriors":
                proc.send_signal(signal.SIGTERM)
                break
        assert proc.wait(timeout=120) == ExitCode.PREEMPTED
    finally:
        proc.kill()
    doc = json.loads(term.read_text())
    assert (doc["status"], doc["reason"]) == ("preempted", "Preempted")
    assert "class images" in doc["message"]
    written = list(cache.rglob("class-*.png"))
    assert len(written) < 10000

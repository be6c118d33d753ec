"""`run --local` stops the trainer cleanly on SIGINT, SIGTERM and SIGHUP: one SIGTERM is forwarded, later signals
are ignored, the trainer's output is read to its end, and a trainer that does not stop is killed after the grace.

A small stand-in for `dreambooth-train` sends the signals to the CLI itself, once it has printed a step.
"""

from __future__ import annotations

import io
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from dreambooth_api.exitcodes import ExitCode
from dreambooth_cli import localrun
from dreambooth_cli.display import ProgressDisplay
from dreambooth_cli.events import parse_line

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FAKE_TRAINER = """
import json, os, signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
print(json.dumps({"event": "step", "step": 1, "totalSteps": 10}), flush=True)
for _ in range(int(os.environ["FAKE_SIGNAL_COUNT"])):
    os.kill(os.getppid(), int(os.environ["FAKE_SIGNAL"]))
if signal.sigtimedwait({signal.SIGTERM}, 120) is None:  # never orphaned for long
    sys.exit(99)
if os.environ.get("FAKE_IGNORE_SIGTERM"):
    print(json.dumps({"event": "ignoring_sigterm"}), flush=True)
    time.sleep(3600)
for i in range(3000):  # more than a pipe buffer: the CLI must keep reading after the signal
    print(json.dumps({"event": "flushing", "i": i}), flush=True)
with open(os.environ["TERMINATION_MESSAGE_PATH"], "w") as f:
    json.dump({"reason": "Preempted", "message": "checkpoint at step 1"}, f)
print(json.dumps({"event": "finished", "status": "preempted", "exitCode": 12}), flush=True)
sys.exit(12)
"""


@pytest.fixture
def fake_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, str(script)])


def config(tmp_path: Path) -> dict[str, Any]:
    return {"output": {"uri": (tmp_path / "out").as_uri()}, "baseModel": {"tiny": True}}


def run(tmp_path: Path) -> tuple[localrun.LocalRun, str]:
    buffer = io.StringIO()
    with ProgressDisplay(Console(file=buffer, force_terminal=False), description="toy") as display:
        result = localrun.run_trainer(config(tmp_path), tmp_path / "w", display)
    return result, buffer.getvalue()


@pytest.mark.usefixtures("fake_trainer")
@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: s.name)
def test_a_stop_signal_is_forwarded_once_and_the_output_is_read_to_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: signal.Signals
) -> None:
    monkeypatch.setenv("FAKE_SIGNAL", str(int(signum)))
    monkeypatch.setenv("FAKE_SIGNAL_COUNT", "2")  # the second one is ignored
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    result, shown = run(tmp_path)
    assert result.exit_code == ExitCode.PREEMPTED
    assert result.termination == {"reason": "Preempted", "message": "checkpoint at step 1"}
    events = [e for e in map(parse_line, result.log_path.read_text().splitlines()) if e]
    assert [e["i"] for e in events if e.get("event") == "flushing"] == list(range(3000))
    assert events[-1] == {"event": "finished", "status": "preempted", "exitCode": 12}
    assert f"{signum.name}: the trainer is writing a checkpoint" in shown
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


@pytest.mark.usefixtures("fake_trainer")
def test_a_trainer_that_does_not_stop_is_killed_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SIGNAL", str(int(signal.SIGTERM)))
    monkeypatch.setenv("FAKE_SIGNAL_COUNT", "1")
    monkeypatch.setenv("FAKE_IGNORE_SIGTERM", "1")
    monkeypatch.setenv("DREAMBOOTH_GRACE_SECONDS", "0")
    monkeypatch.setattr(localrun, "STOP_MARGIN_SECONDS", 0.5)
    result, _ = run(tmp_path)
    assert result.exit_code == -signal.SIGKILL
    assert "ignoring_sigterm" in result.log_path.read_text()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, 55.0), ({"DREAMBOOTH_GRACE_SECONDS": "100"}, 130.0), ({"DREAMBOOTH_GRACE_SECONDS": "x"}, 55.0)],
)
def test_stop_grace(environ: dict[str, str], expected: float) -> None:
    assert localrun.stop_grace_seconds(environ) == expected

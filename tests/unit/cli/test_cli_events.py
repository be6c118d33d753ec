"""The trainer's JSON lines -> progress; status formatting for list/status/watch."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dreambooth_cli import events, present
from dreambooth_cli.events import Progress, describe_event, is_notable, parse_line


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ('{"event": "step", "step": 3}\n', {"event": "step", "step": 3}),
        ("Loading pipeline components...: 100%", None),
        ("{not json", None),
        ("[1, 2]", None),
        ("", None),
    ],
)
def test_parse_line(line: str, parsed: dict | None) -> None:
    assert parse_line(line) == parsed


def test_step_events_update_progress() -> None:
    p = Progress()
    event = {
        "ts": "2026-11-27T00:00:00Z",
        "level": "info",
        "event": "step",
        "step": 12,
        "totalSteps": 40,
        "loss": 0.1234,
        "lr": 1e-4,
        "stepsPerSecond": 3.1,
        "etaSeconds": 9.0,
    }
    assert p.update(event)
    assert p.describe() == "step 12/40 loss 0.1234 lr 1.00e-04 3.10 it/s eta 9s"
    assert not p.update({"event": "resumed", "step": 10, "uri": "file:///c"})
    assert p.step == 12
    assert not p.update({"event": "step"})


def test_notable_events() -> None:
    assert is_notable({"event": "resumed", "step": 10})
    assert is_notable({"event": "anything", "level": "warning"})
    assert not is_notable({"event": "step", "level": "info"})
    assert describe_event({"ts": "t", "level": "info", "event": "resumed", "step": 10}) == "[info] resumed step=10"


def job(status: dict | None = None) -> dict:
    return {
        "metadata": {"name": "toy", "namespace": "ml", "creationTimestamp": "2026-11-27T00:00:00Z"},
        "spec": {"training": {"maxSteps": 800}},
        **({"status": status} if status is not None else {}),
    }


def test_job_row_before_any_status() -> None:
    now = datetime(2026, 11, 27, 0, 2, 5, tzinfo=UTC)
    assert present.job_row(job(), now) == ["toy", "ml", "Pending", "0/800", "-", "0", "-", "2m"]


def test_job_row_and_details_from_status() -> None:
    status = {
        "phase": "Running",
        "attempt": 1,
        "progress": {
            "step": 412,
            "totalSteps": 800,
            "loss": 0.11,
            "stepsPerSecond": 4.2,
            "etaSeconds": 92.0,
            "stepsRedone": 7,
        },
        "restarts": {"preemptions": 2, "failures": 1, "total": 3},  # as the operator writes it
        "lastCheckpoint": {"step": 400, "uri": "s3://b/out/checkpoints/step-00000400"},
        "outputs": {"modelUri": "s3://b/out/model", "evaluation": {"clipScore": 0.3}},
        "usage": {
            "podSeconds": 187,
            "gpuSeconds": 748,
            "gpusPerPod": 4,
            "pods": [{"uid": "a", "start": "t", "end": "t"}, {"uid": "b", "start": "t", "end": "t"}],
        },
        "conditions": [
            {"type": "Running", "status": "True", "reason": "Training", "message": "", "lastTransitionTime": "t"},
        ],
    }
    now = datetime(2026, 11, 28, 1, 0, 0, tzinfo=UTC)
    assert present.job_row(job(status), now) == ["toy", "ml", "Running", "412/800", "0.1100", "3", "12.5", "1d"]
    details = dict(present.detail_rows(job(status)))
    assert details["progress"] == "step 412/800 loss 0.1100 4.20 it/s eta 92s"
    assert details["restarts"] == "failures 1, preemptions 2, total 3"
    assert details["steps redone"] == "7 (lost to restarts between a checkpoint and a hard kill)"
    assert details["gpu time"] == "12.5 GPU-min (2 pod(s) x 4 GPU(s), 187 pod-s)"
    assert "gpu time" not in dict(present.detail_rows(job({"phase": "Pending"})))
    # Without a total (an older status), the two counts are added.
    older = {**status, "restarts": {"preemptions": 2, "failures": 1}}
    assert present.job_row(job(older), now)[5] == "3"
    assert details["last checkpoint"] == "step 400 s3://b/out/checkpoints/step-00000400"
    assert details["modelUri"] == "s3://b/out/model"
    assert details["evaluation clipScore"] == "0.3"
    assert present.condition_rows(job(status)) == [["Running", "True", "Training", "", "t"]]


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (90, "1m"), (7200, "2h"), (200000, "2d")])
def test_age(seconds: int, text: str) -> None:
    now = datetime.fromtimestamp(1_800_000_000 + seconds, UTC)
    created = datetime.fromtimestamp(1_800_000_000, UTC).isoformat()
    assert present.age(created, now) == text


def test_display_draws_a_live_bar_on_a_terminal_and_plain_lines_otherwise() -> None:
    import io

    from rich.console import Console

    from dreambooth_cli.display import ProgressDisplay

    progress = Progress()
    tty = io.StringIO()
    with ProgressDisplay(Console(file=tty, force_terminal=True, width=120), description="toy") as display:
        for step in (1, 20, 40):
            progress.update({"event": "step", "step": step, "totalSteps": 40, "loss": 0.5})
            display.update(progress)
    drawn = tty.getvalue()
    assert "━" in drawn  # the bar
    assert "40/40" in drawn
    assert "loss 0.5000" in drawn

    plain = io.StringIO()
    progress = Progress()
    with ProgressDisplay(Console(file=plain, force_terminal=False, width=120)) as display:
        for step in range(1, 41):
            progress.update({"event": "step", "step": step, "totalSteps": 40, "loss": 0.5})
            display.update(progress)
    lines = plain.getvalue().splitlines()
    # Throttled: the first and the last step at least, far fewer than 40 lines, no control codes.
    assert lines[0] == "step 1/40 loss 0.5000"
    assert lines[-1] == "step 40/40 loss 0.5000"
    assert len(lines) < 10
    assert "\x1b" not in plain.getvalue()


def test_a_log_event_reads_as_one_line() -> None:
    event = {"ts": "2026-12-06T01:02:03.456Z", "level": "info", "event": "step", "step": 12, "loss": 0.123456789}
    assert events.format_log_event(event) == "01:02:03 info step step=12 loss=0.1235"
    assert events.format_log_event({"event": "exported", "uri": "s3://b/m"}) == "info exported uri=s3://b/m"

"""What the CLI prints: data with brackets is shown as it is, and a bad command line is one `error:` line."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from rich.console import Console

from dreambooth_cli import app, kube
from dreambooth_cli.app import main
from dreambooth_cli.display import ProgressDisplay
from dreambooth_cli.errors import ExitStatus
from dreambooth_cli.events import Progress

BRACKETED = [
    "s3://b/[draft]/x",
    "Input should be >= 1 [type=greater_than_equal, input_value=0, input_type=int]",
    "path [/tmp/x] missing",
    "[bold]not bold[/bold]",
]


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """main()'s exit status (0 when it returns), stdout and stderr."""
    code: object = 0
    try:
        main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return (code if isinstance(code, int) else 1), captured.out, captured.err


def fake_cluster(monkeypatch: pytest.MonkeyPatch, job: dict[str, Any]) -> None:
    target = kube.Target(client.ApiClient(client.Configuration()), "ns", "https://127.0.0.1:1")
    monkeypatch.setattr(kube, "connect", lambda *_: target)
    monkeypatch.setattr(kube, "get_job", lambda *_: job)
    monkeypatch.setattr(kube, "list_jobs", lambda *_: [job])


def bracketed_job() -> dict[str, Any]:
    return {
        "metadata": {"name": "toy", "namespace": "ns", "creationTimestamp": "2026-11-27T00:00:00Z"},
        "spec": {"training": {"maxSteps": 20}},
        "status": {
            "phase": "Failed",
            "message": BRACKETED[1],
            "lastCheckpoint": {"step": 10, "uri": BRACKETED[0]},
            "outputs": {"modelUri": BRACKETED[0], "samplesUri": BRACKETED[3]},
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "InvalidInput", "message": BRACKETED[2]},
                {"type": "Running", "status": "False", "reason": "[x]", "message": BRACKETED[1]},
            ],
        },
    }


def test_status_shows_bracketed_messages_and_uris_as_they_are(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_cluster(monkeypatch, bracketed_job())
    code, out, err = run_main(capsys, "status", "toy")
    assert code == ExitStatus.JOB_FAILED, err  # the bracketed job is a failed one: status exits 4
    for text in BRACKETED:
        assert text in out
    assert "[x]" in out


def test_list_shows_a_bracketed_phase(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    job = bracketed_job()
    job["status"]["phase"] = "[/weird]"
    fake_cluster(monkeypatch, job)
    code, out, err = run_main(capsys, "list")
    assert code == 0, err
    assert "[/weird]" in out


def test_printed_paths_keep_their_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    app.say("model:   /runs/[exp]/model")
    assert capsys.readouterr().out == "model:   /runs/[exp]/model\n"


@pytest.mark.parametrize("terminal", [True, False])
def test_the_progress_display_shows_a_bracketed_phase(terminal: bool) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=200, color_system=None)
    with ProgressDisplay(console, description="[/toy]") as display:
        display.update(Progress(step=3, total_steps=10, loss=0.5, phase="[/Running]"), force=True)
        display.note("[info] checkpoint uri=[/x]")
    text = buffer.getvalue()
    assert "[info] checkpoint uri=[/x]" in text
    assert "step 3/10" in text or "3/10" in text
    if terminal:
        assert "[/Running]" in text


def test_a_missing_argument_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "run")
    assert code == ExitStatus.INVALID_INPUT
    assert out == ""
    assert err.splitlines() == ["error: Missing argument 'JOB_FILE'. (see: dreambooth run --help)"]


def test_an_unknown_option_is_one_error_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "report", str(tmp_path), "--bogus")
    assert code == ExitStatus.INVALID_INPUT
    assert err.splitlines() == ["error: No such option '--bogus'. (see: dreambooth report --help)"]


def test_no_arguments_still_shows_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, err = run_main(capsys)
    assert "Usage: dreambooth" in out + err
    assert "submit" in out + err

"""`run --local` after the last step: the trainer's evaluation (sampling and scoring, minutes on a real model) shows
as lines above the finished training bar, and the bar's title becomes Evaluating. A stand-in for `dreambooth-train`
prints the evaluation events as the trainer's evaluation stage logs them (their names checked against its source)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from dreambooth_cli import localrun
from dreambooth_cli.display import ProgressDisplay
from dreambooth_cli.events import evaluation_note
from tests.infra.paths import ROOT

EVENTS = [
    {"event": "step", "step": 10, "totalSteps": 10, "loss": 0.5},
    {"event": "evaluation_started", "prompts": 2, "imagesPerPrompt": 2},
    *({"event": "evaluation_progress", "stage": "sampling", "done": i, "total": 4} for i in range(1, 5)),
    {"event": "evaluation", "scores": {"dino": 0.61234, "clipI": 0.8}, "qualityGate": "passed", "seconds": 3.0},
]
STAGE = ROOT / "trainer/src/dreambooth_trainer/evaluation/stage.py"


@pytest.fixture
def fake_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "fake_trainer.py"
    lines = "\n".join(json.dumps(e) for e in EVENTS)
    script.write_text(f"print({lines!r}, flush=True)\n")
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, str(script)])


def test_the_event_names_are_the_trainer_evaluation_stages() -> None:
    source = STAGE.read_text()
    for name in ("evaluation_started", "evaluation_progress", "evaluation"):
        assert f'log.info(\n        "{name}"' in source or f'log.info("{name}"' in source, name


def test_evaluation_events_become_lines_each_stage_shown_at_its_first_and_last_item() -> None:
    assert evaluation_note(EVENTS[1]) == "evaluating: 2 prompt(s) x 2 image(s)"
    assert [evaluation_note(e) for e in EVENTS[2:6]] == ["evaluating: sampling 1/4", "", "", "evaluating: sampling 4/4"]
    assert evaluation_note(EVENTS[6]) == "evaluated: clipI 0.8, dino 0.6123; quality gate passed"
    assert evaluation_note({"event": "evaluation", "scores": None}) == "evaluated: no scores; quality gate None"
    assert evaluation_note(EVENTS[0]) is None
    assert evaluation_note({"event": "evaluation_failed", "level": "warning"}) is None  # a warning line of its own


@pytest.mark.usefixtures("fake_trainer")
@pytest.mark.parametrize("terminal", [False, True], ids=["plain", "terminal"])
def test_a_local_run_shows_its_evaluation_after_the_last_step(tmp_path: Path, terminal: bool) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=200, color_system=None)
    config = {"output": {"uri": (tmp_path / "out").as_uri()}, "baseModel": {"tiny": True}}
    with ProgressDisplay(console, description="toy") as display:
        result = localrun.run_trainer(config, tmp_path / "w", display)
    assert result.exit_code == 0
    shown = buffer.getvalue()
    expected = [
        "evaluating: 2 prompt(s) x 2 image(s)",
        "evaluating: sampling 1/4",
        "evaluating: sampling 4/4",
        "evaluated: clipI 0.8, dino 0.6123; quality gate passed",
    ]
    positions = [shown.find(line) for line in expected]
    assert -1 not in positions, shown
    assert positions == sorted(positions), shown
    assert "sampling 2/4" not in shown
    if terminal:
        assert "Evaluating" in shown  # the bar's title after the last step

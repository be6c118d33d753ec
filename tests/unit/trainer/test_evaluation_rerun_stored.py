"""`dreambooth-train --evaluate` (the operator's `<job>-eval` pod): a job that cannot be evaluated again (no
evaluation section, no exported model under output.uri) exits 10 with the reason in the termination message, which
the operator quotes in the Reevaluated condition. (The evaluation itself: tests/e2e/test_evaluate_job.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dreambooth_api.exitcodes import ExitCode
from dreambooth_trainer.cli import main

TINY = {"tiny": True}


def _config(tmp_path: Path, evaluation: dict[str, Any] | None) -> Path:
    config: dict[str, Any] = {
        "instanceImages": {"uri": f"file://{tmp_path}/photos", "prompt": "a photo of sks dog"},
        "training": {"maxSteps": 2, "resolution": 32},
        "output": {"uri": f"file://{tmp_path}/out"},
    }
    if evaluation is not None:
        config["evaluation"] = evaluation
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("evaluation", "why"),
    [
        (None, "the job has no evaluation (spec.evaluation.enabled)"),
        ({"enabled": True, "dinoModel": TINY, "clipModel": TINY}, "no exported model (model/ or lora/)"),
    ],
)
def test_a_job_that_cannot_be_evaluated_exits_10_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evaluation: dict[str, Any] | None, why: str
) -> None:
    term = tmp_path / "termination-log"
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(term))
    code = main(["--evaluate", "--config", str(_config(tmp_path, evaluation)), "--workdir", str(tmp_path / "w")])
    assert code == ExitCode.INVALID_INPUT
    message = json.loads(term.read_text())
    assert (message["status"], message["reason"]) == ("failed", "InvalidInput")
    assert why in message["message"]

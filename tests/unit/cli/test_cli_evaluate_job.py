"""`dreambooth evaluate NAME|DIR`: an existing folder is a local run, anything else a job in the cluster; a fresh
token per request; the outcome read from status.observedEvaluateRequest and the Reevaluated condition; the progress
line and the scores as `status` prints them. (tests/e2e/test_evaluate_job.py runs it against the operator.)"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dreambooth_cli import evaluate
from dreambooth_cli.app import main
from dreambooth_cli.errors import ExitStatus

SCORES = {"dino": 0.61234, "clipI": 0.8}


def job(served: str | None, reason: str = "Reevaluated", message: str = "request t1: dino 0.6123") -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Succeeded",
        "conditions": [{"type": "Reevaluated", "status": "True", "reason": reason, "message": message}],
        "outputs": {"modelUri": "s3://m", "evaluation": SCORES, "qualityGate": "passed", "evaluationUri": "s3://m/e"},
    }
    if served is not None:
        status["observedEvaluateRequest"] = served
    return {"metadata": {"name": "toy", "namespace": "ns"}, "spec": {}, "status": status}


def test_an_existing_folder_is_a_local_run_anything_else_a_job_name(tmp_path: Path) -> None:
    assert evaluate.is_local_run(str(tmp_path))
    assert not evaluate.is_local_run("toy")
    assert not evaluate.is_local_run(str(tmp_path / "toy"))
    (tmp_path / "file").write_text("x")
    assert not evaluate.is_local_run(str(tmp_path / "file"))


def test_each_request_gets_a_fresh_readable_token() -> None:
    at = datetime(2026, 12, 6, 8, 0, 1, tzinfo=UTC)
    tokens = {evaluate.new_token(at) for _ in range(50)}
    assert len(tokens) == 50
    assert all(t.startswith("20261206T080001Z-") and len(t) <= 128 for t in tokens)


@pytest.mark.parametrize(
    ("served", "reason", "expected"),
    [
        (None, "Reevaluated", None),
        ("t0", "Reevaluated", None),  # an earlier request's outcome
        ("t1", "Reevaluated", ("Reevaluated", True)),
        ("t1", "ReevaluationFailed", ("ReevaluationFailed", False)),
        ("t1", "ReevaluationNotPossible", ("ReevaluationNotPossible", False)),
    ],
)
def test_the_outcome_is_read_once_the_operator_served_this_request(
    served: str | None, reason: str, expected: tuple[str, bool] | None
) -> None:
    got = evaluate.outcome(job(served, reason), "t1")
    assert (None if got is None else (got.reason, got.ok)) == expected


def test_the_progress_line_is_the_condition_of_this_request_only() -> None:
    running = job(None, "Reevaluating", "request t1: evaluating the exported model again (Job toy-eval)")
    assert evaluate.progress_line(running, "t1") == "evaluating the exported model again (Job toy-eval)"
    assert evaluate.progress_line(running, "t2") == "waiting for the operator"


def test_the_scores_are_printed_as_status_prints_them() -> None:
    rows = dict(evaluate.score_rows(job("t1")))
    assert rows == {
        "evaluation clipI": "0.8",
        "evaluation dino": "0.6123",
        "quality gate": "passed",
        "evaluation detail": "s3://m/e",
    }


def test_a_job_name_needs_a_cluster(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "toy", "--kubeconfig", str(tmp_path / "nope")])
    assert exit_.value.code == ExitStatus.NO_CLUSTER
    assert "toy" not in capsys.readouterr().out

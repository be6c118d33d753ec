"""Progress policy: rank 0's typed /progress document -> status.progress, steps redone, the last checkpoint."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from dreambooth_api.progress import parse_progress
from dreambooth_operator.handlers.jobs import record_metrics
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.observed import ProgressSample
from dreambooth_operator.policies import progress
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import NOW, after, attempt_of, builder, cond, run


def test_running_pod_is_initializing_until_progress_says_training() -> None:
    job = make_job().status(attempt=0, phase="Pending", startTime=iso(T0)).obj()
    pod = make_pod(job).running().obj()
    plan = run(job, [make_batch_job(job).obj()], [pod])
    assert plan.status.phase == "Initializing"
    assert cond(plan, "Running") == ("True", "PodsRunning")
    sample = ProgressSample(
        attempt=0,
        pod_uid=pod["metadata"]["uid"],
        pod_start=T0,
        document=parse_progress(
            {
                "phase": "Training",
                "step": 5,
                "totalSteps": 10,
                "loss": 0.2,
                "stepsPerSecond": 2.0,
                "etaSeconds": 2.5,
                "lastCheckpoint": {"step": 4, "uri": "s3://b/ckpt/step-00000004", "time": iso(T0)},
            }
        ),
        at=NOW,
    )
    plan = run(job, [make_batch_job(job).obj()], [pod], progress=sample)
    assert plan.status.phase == "Running"
    assert plan.status.progress_text == "5/10"
    assert plan.status.progress is not None
    assert plan.status.progress.loss == 0.2
    assert plan.status.last_checkpoint is not None
    assert plan.status.last_checkpoint.step == 4
    assert cond(plan, "Checkpointed") == ("True", "CheckpointWritten")
    # A stale sample with a lower step from the same pod never moves progress back.
    stale = ProgressSample(
        0, pod["metadata"]["uid"], T0, parse_progress({"phase": "Training", "step": 3, "totalSteps": 10}), NOW
    )
    again = run(after(job, plan), [make_batch_job(job).obj()], [pod], progress=stale)
    assert again.status.progress is not None
    assert again.status.progress.step == 5
    # A sample from another attempt is ignored.
    other = ProgressSample(1, pod["metadata"]["uid"], T0, parse_progress({"step": 9, "totalSteps": 10}), NOW)
    assert run(after(job, plan), [make_batch_job(job).obj()], [pod], progress=other).status.progress_text == "5/10"


def test_a_trainer_that_evaluates_after_the_export_shows_it_in_the_status() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).running().obj()

    def sample(phase: str) -> ProgressSample:
        doc = parse_progress({"phase": phase, "step": 20, "totalSteps": 20})
        return ProgressSample(0, pod["metadata"]["uid"], T0, doc, NOW)

    plan = run(job, [make_batch_job(job).obj()], [pod], progress=sample("Evaluating"))
    assert (plan.status.phase, plan.status.message) == ("Running", "evaluating the trained model")
    assert plan.status.progress is not None
    assert plan.status.progress.stage == "Evaluating"
    assert cond(plan, "Running") == ("True", "Training")
    exporting = run(job, [make_batch_job(job).obj()], [pod], progress=sample("Exporting"))
    assert (exporting.status.phase, exporting.status.message) == ("Running", "training")


def test_steps_redone_after_restarts_are_counted_once_against_the_resumed_checkpoint() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    batch = [make_batch_job(job).obj()]

    def sample(pod: dict[str, Any], at: datetime, phase: str, step: int, resumed: int | None) -> ProgressSample:
        data = {"phase": phase, "step": step, "totalSteps": 100, "resumedFrom": resumed}
        return ProgressSample(0, pod["metadata"]["uid"], _started(pod), parse_progress(data), at)

    first = make_pod(job, uid="p1").running(started=T0).obj()
    plan = run(job, batch, [first], progress=sample(first, NOW, "Training", 30, None))
    # Killed at step 30 or later (no checkpoint on the way out); its replacement loads the model first: progress
    # keeps the step seen last until the checkpoint is restored, and shows the new pod's stage.
    second = make_pod(job, uid="p2").running(started=NOW + timedelta(seconds=10)).obj()
    loading = run(
        after(job, plan), batch, [second], progress=sample(second, NOW + timedelta(seconds=20), "Initializing", 0, None)
    )
    assert loading.status.progress is not None
    assert (loading.status.progress.step, loading.status.progress.stage) == (30, "Initializing")
    assert loading.status.progress.steps_redone == 0
    # It resumed from the checkpoint at step 20: steps 20..30 are done again.
    resumed = run(
        after(job, loading), batch, [second], progress=sample(second, NOW + timedelta(seconds=30), "Training", 22, 20)
    )
    assert resumed.status.progress is not None
    assert (resumed.status.progress.step, resumed.status.progress.steps_redone) == (22, 10)
    metrics = OperatorMetrics()
    record_metrics(metrics, after(job, loading), None, resumed)
    assert metrics.steps_redone._value.get() == 10
    # Counted once: later samples of that pod add nothing.
    later = run(
        after(job, resumed), batch, [second], progress=sample(second, NOW + timedelta(seconds=40), "Training", 40, 20)
    )
    assert later.status.progress is not None
    assert (later.status.progress.step, later.status.progress.steps_redone) == (40, 10)
    record_metrics(metrics, after(job, resumed), None, later)
    assert metrics.steps_redone._value.get() == 10
    # A preemption that checkpointed on the way out (step 40) loses nothing.
    third = make_pod(job, uid="p3").running(started=NOW + timedelta(seconds=50)).obj()
    again = run(
        after(job, later), batch, [third], progress=sample(third, NOW + timedelta(seconds=60), "Training", 41, 40)
    )
    assert again.status.progress is not None
    assert (again.status.progress.step, again.status.progress.steps_redone) == (41, 10)


def _started(pod: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(pod["status"]["startTime"])


def _sample(pod: dict[str, Any], data: dict[str, Any] | str, attempt: int = 0, at: datetime = NOW) -> ProgressSample:
    return ProgressSample(attempt, pod["metadata"]["uid"], _started(pod), parse_progress(data), at)


def test_a_sample_from_another_pod_of_the_attempt_is_not_taken() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod, other = make_pod(job, uid="p1").running().obj(), make_pod(job, uid="p2").running().obj()
    b = builder(job, batch_jobs=[make_batch_job(job).obj()], pods=[pod], progress=_sample(other, {"step": 5}))
    progress.take_sample(b, attempt_of(b))
    assert b.status.progress is None


def test_non_finite_and_mistyped_numbers_never_reach_the_status() -> None:
    """Issue 17: a NaN loss in the status made every later status write fail (JSON has no NaN)."""
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).running().obj()
    body = (
        '{"phase": "Training", "step": 7, "totalSteps": "ten", "loss": NaN, "lr": -Infinity,'
        ' "stepsPerSecond": Infinity, "etaSeconds": [1], "lastCheckpoint": {"step": "x", "uri": "s3://b/c"}}'
    )
    plan = run(job, [make_batch_job(job).obj()], [pod], progress=_sample(pod, body))
    assert plan.status.progress is not None
    assert (plan.status.progress.step, plan.status.progress.total_steps) == (7, 0)
    assert plan.status.progress.loss is None
    assert plan.status.progress.steps_per_second is None
    assert plan.status.progress.eta_seconds is None
    assert plan.status.last_checkpoint is None
    json.dumps(plan.status_wire(), allow_nan=False)


def test_a_sample_without_a_total_keeps_the_total_seen_before() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).running().obj()
    first = run(job, [make_batch_job(job).obj()], [pod], progress=_sample(pod, {"step": 5, "totalSteps": 10}))
    later = _sample(pod, {"step": 6}, at=NOW + timedelta(seconds=10))
    plan = run(after(job, first), [make_batch_job(job).obj()], [pod], progress=later)
    assert plan.status.progress_text == "6/10"


def test_an_older_trainer_without_resumed_from_counts_as_resumed_at_its_first_step() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    batch = [make_batch_job(job).obj()]
    first = make_pod(job, uid="p1").running(started=T0).obj()
    plan = run(job, batch, [first], progress=_sample(first, {"phase": "Training", "step": 30}))
    second = make_pod(job, uid="p2").running(started=NOW + timedelta(seconds=10)).obj()
    resumed = _sample(second, {"phase": "Training", "step": 25}, at=NOW + timedelta(seconds=20))
    again = run(after(job, plan), batch, [second], progress=resumed)
    assert again.status.progress is not None
    assert (again.status.progress.step, again.status.progress.steps_redone) == (25, 5)


@pytest.mark.parametrize(
    ("raw", "shown"), [(0.9842754602432251, 0.9843), (1.23456e-05, 1.235e-05), (12345.678, 12350.0), (None, None)]
)
def test_the_status_loss_is_rounded_to_four_significant_digits(raw: float | None, shown: float | None) -> None:
    """Issue 20: the LOSS column printed 0.9842754602432251."""
    assert progress.rounded(raw) == shown


def test_a_sample_that_changes_nothing_but_its_time_writes_nothing() -> None:
    """An initializing pod polled again: the status keeps the first sample (so `kubectl get -w` prints no identical
    row); a sample with anything new is taken."""
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).running().obj()
    doc = {"phase": "Initializing", "step": 0, "totalSteps": 10}
    first = run(job, [make_batch_job(job).obj()], [pod], progress=_sample(pod, doc))
    assert first.status.progress is not None
    same = run(
        after(job, first),
        [make_batch_job(job).obj()],
        [pod],
        progress=_sample(pod, doc, at=NOW + timedelta(seconds=10)),
    )
    assert same.status.progress == first.status.progress
    moved = {**doc, "phase": "Training", "step": 1}
    later = run(
        after(job, first),
        [make_batch_job(job).obj()],
        [pod],
        progress=_sample(pod, moved, at=NOW + timedelta(seconds=20)),
    )
    assert later.status.progress is not None
    assert (later.status.progress.step, later.status.progress.updated_at) == (1, NOW + timedelta(seconds=20))

"""Failure policy: pod failure classification and the gang's deciding failure."""

from __future__ import annotations

import pytest

from dreambooth_operator.builders import parse_spec
from dreambooth_operator.plan import Action, ActionKind
from dreambooth_operator.policies import failure
from dreambooth_operator.policies.failure import (
    FailureKind,
    GangFailure,
    classify,
    exceeds_backoff,
    gang_failure,
)
from tests.infra.wrappers import T0, PodWrapper, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import attempt_of, builder, cond, run

JOB = make_job().nodes(2).obj()


@pytest.mark.parametrize(
    ("pod", "kind"),
    [
        (make_pod(JOB).running(), None),
        (make_pod(JOB).exited(0), None),
        (make_pod(JOB).exited(10, {"message": "bad image"}), FailureKind.INVALID_INPUT),
        (make_pod(JOB).exited(11), FailureKind.RETRYABLE),
        (make_pod(JOB).exited(137), FailureKind.RETRYABLE),
        (make_pod(JOB).exited(12), FailureKind.PREEMPTED),
        (make_pod(JOB).running().disrupted(), FailureKind.PREEMPTED),
        (make_pod(JOB).exited(1).disrupted(), FailureKind.PREEMPTED),
    ],
)
def test_classify(pod: PodWrapper, kind: FailureKind | None) -> None:
    assert classify(pod.obj()) is kind


def test_gang_failure_prefers_invalid_input_then_preemption_then_retryable() -> None:
    """A rank that loses its preempted peer crashes on the broken collective: the attempt was preempted."""
    preempted = make_pod(JOB, rank=1).running().disrupted().obj()
    crashed = make_pod(JOB, rank=0).exited(11, "gloo: connection reset by peer").obj()
    gang = gang_failure([crashed, preempted])
    assert gang is not None
    assert gang.kind is FailureKind.PREEMPTED
    assert gang.message == "rank 1 (pod cat-a0-1-abcde) was preempted"
    exited12 = make_pod(JOB, rank=1).exited(12).obj()
    assert gang_failure([crashed, exited12]) == GangFailure(FailureKind.PREEMPTED, exited12)
    invalid = make_pod(JOB, rank=1).exited(10, {"message": "bad image"}).obj()
    assert gang_failure([preempted, invalid]) == GangFailure(FailureKind.INVALID_INPUT, invalid)
    only_crash = gang_failure([crashed, make_pod(JOB, rank=1).running().obj()])
    assert only_crash == GangFailure(FailureKind.RETRYABLE, crashed)
    assert gang_failure([make_pod(JOB).running().obj()]) is None


def test_backoff() -> None:
    assert not exceeds_backoff(3, 3)
    assert exceeds_backoff(4, 3)
    assert exceeds_backoff(1, 0)


def test_invalid_input_fails_at_once_with_the_trainer_message() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).exited(10, {"status": "failed", "reason": "InvalidInput", "message": "cat3.jpg is bad"})
    plan = run(job, [make_batch_job(job).failed("PodFailurePolicy", "x").obj()], [pod.obj()])
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "InvalidInput")
    assert plan.status.message == "cat3.jpg is bad"


def test_a_diverged_loss_fails_at_once_as_loss_diverged_with_a_hint() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    message = {"status": "failed", "reason": "LossDiverged", "message": "the loss was NaN for 3 steps in a row"}
    pod = make_pod(job).exited(10, message)
    plan = run(job, [make_batch_job(job).failed("PodFailurePolicy", "x").obj()], [pod.obj()])
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "LossDiverged")
    assert plan.status.reason == "LossDiverged"
    assert plan.status.restarts.total == 0
    (event,) = [e for e in plan.events if e.reason == "LossDiverged"]
    assert event.type == "Warning"
    assert "the loss was NaN for 3 steps in a row" in event.message
    assert "training.learningRate" in event.message


def test_single_node_backoff_limit_exceeded() -> None:
    job = make_job().run_policy(backoffLimit=1).status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    batch = make_batch_job(job).failed().failed_count(2).obj()
    plan = run(job, [batch], [make_pod(job).exited(11).obj()])
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "BackoffLimitExceeded")
    assert plan.status.restarts.failures == 2
    assert plan.status.restarts.total == 2


def test_a_batch_job_past_its_own_deadline_fails_the_job_as_deadline_exceeded() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    batch = make_batch_job(job).failed("DeadlineExceeded", "Job was active longer than specified deadline").obj()
    b = builder(job, batch_jobs=[batch])
    assert failure.batch_job_failed(b, parse_spec(job), attempt_of(b))
    assert b.status.phase == "Failed"
    assert cond(b.plan(), "Failed") == ("True", "DeadlineExceeded")


def test_invalid_input_of_a_gang_stops_its_other_ranks() -> None:
    job = make_job().nodes(2).status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pods = [make_pod(job, 0, 0).running().obj(), make_pod(job, 0, 1).exited(10, {"message": "bad caption"}).obj()]
    b = builder(job, batch_jobs=[make_batch_job(job).obj()], pods=pods)
    assert failure.invalid_input(b, parse_spec(job), attempt_of(b))
    assert b.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]
    assert b.status.message == "bad caption"

"""Failure policy: pod failure classification and the gang's deciding failure."""

from __future__ import annotations

import pytest
from operator_wrappers import PodWrapper, make_job, make_pod

from dreambooth_operator.policies.failure import (
    FailureKind,
    GangFailure,
    classify,
    exceeds_backoff,
    gang_failure,
)

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

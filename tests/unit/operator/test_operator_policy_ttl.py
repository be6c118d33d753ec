"""TTL policy."""

from __future__ import annotations

from datetime import timedelta

from dreambooth_operator.plan import Action, ActionKind
from dreambooth_operator.policies import ttl
from dreambooth_operator.policies.ttl import expired, remaining_seconds
from tests.infra.wrappers import T0, iso, make_batch_job, make_job
from tests.unit.operator.operator_plans import after, builder, cond, reasons, run


def test_ttl() -> None:
    assert remaining_seconds(None, 5, T0) is None
    assert remaining_seconds(T0, None, T0) is None
    assert remaining_seconds(T0, 0, T0) == 0
    assert expired(T0, 0, T0)
    assert not expired(T0, 30, T0 + timedelta(seconds=29))
    assert expired(T0, 30, T0 + timedelta(seconds=31))


def test_ttl_deletes_children_once_due_and_keeps_the_job() -> None:
    job = make_job().run_policy(ttlSecondsAfterFinished=60)
    job = job.status(phase="Succeeded", completionTime=iso(T0), startTime=iso(T0)).obj()
    children = [make_batch_job(job).complete().obj()]
    early = run(job, children, [], now=T0 + timedelta(seconds=10))
    assert early.actions == []
    assert early.requeue_after == 50
    due = run(job, children, [], now=T0 + timedelta(seconds=61))
    assert due.actions == [Action(ActionKind.DELETE_CHILDREN, name="cat")]
    assert ("Normal", "ChildDeleted") in reasons(due)
    assert cond(due, "Running") == ("False", "ChildDeleted")
    assert due.status.phase == "Succeeded"
    assert not due.finished
    # The Service and ConfigMap are not observed: without batch Jobs left, the recorded deletion ends it.
    done = run(after(job, due), [], [], now=T0 + timedelta(seconds=70))
    assert done.actions == []
    assert done.finished
    # Even with no batch Job left (a deadline deleted it), the TTL still deletes the other children once.
    assert run(job, [], [], now=T0 + timedelta(seconds=61)).actions == [Action(ActionKind.DELETE_CHILDREN, name="cat")]


def test_without_a_ttl_a_terminal_job_is_finished_at_once() -> None:
    job = make_job().status(phase="Failed", completionTime=iso(T0), startTime=iso(T0)).obj()
    plan = ttl.finish(builder(job, batch_jobs=[make_batch_job(job).failed().obj()]))
    assert plan.finished
    assert plan.actions == []

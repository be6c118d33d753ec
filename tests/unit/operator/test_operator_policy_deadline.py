"""Deadline policy."""

from __future__ import annotations

from datetime import timedelta

from dreambooth_operator.builders import parse_spec
from dreambooth_operator.plan import Action, ActionKind
from dreambooth_operator.policies import deadline
from dreambooth_operator.policies.deadline import exceeded, remaining_seconds
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import after, cond, run


def test_deadline() -> None:
    assert remaining_seconds(T0, None, T0) is None
    assert remaining_seconds(None, 10, T0) is None
    assert remaining_seconds(T0, 10, T0 + timedelta(seconds=4)) == 6
    assert not exceeded(T0, 10, T0 + timedelta(seconds=9))
    assert exceeded(T0, 10, T0 + timedelta(seconds=10))


def test_deadline_exceeded_stops_the_pods_and_fails() -> None:
    job = make_job().run_policy(activeDeadlineSeconds=20).status(attempt=0, phase="Running", startTime=iso(T0))
    plan = run(job.obj(), [make_batch_job(job.obj()).obj()], [make_pod(job.obj()).running().obj()])
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "DeadlineExceeded")
    assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]
    early = run(job.obj(), [make_batch_job(job.obj()).obj()], [], now=T0 + timedelta(seconds=5))
    assert early.requeue_after == 15


def test_time_queued_for_admission_does_not_count_against_the_deadline() -> None:
    job = make_job().queue("gpu").run_policy(activeDeadlineSeconds=3600).no_preflight().obj()
    plan = run(job)
    assert plan.status.phase == "Queued"
    assert plan.status.start_time is None
    job = after(job, plan)
    queued = T0 + timedelta(hours=2)
    plan = run(job, [make_batch_job(job).suspended().obj()], [], now=queued)
    assert plan.status.phase == "Queued"
    assert plan.status.start_time is None
    assert plan.requeue_after is None
    admitted = queued + timedelta(seconds=5)
    plan = run(after(job, plan), [make_batch_job(job).obj()], [make_pod(job).running().obj()], now=admitted)
    assert plan.status.phase == "Initializing"
    assert plan.status.start_time == admitted
    assert plan.requeue_after == 3600


def test_admission_or_resume_restarts_a_deadline_clock_started_before() -> None:
    """A startTime set while queued or before a suspend (say, by an older operator) is reset, not counted."""
    for phase, spec_job in (("Queued", make_job().queue("gpu")), ("Suspended", make_job())):
        job = spec_job.run_policy(activeDeadlineSeconds=60).status(attempt=0, phase=phase, startTime=iso(T0)).obj()
        later = T0 + timedelta(hours=1)
        plan = run(job, [make_batch_job(job).suspended(phase == "Suspended").obj()], [], now=later)
        assert plan.status.phase != "Failed"
        assert plan.status.start_time == later
        assert plan.requeue_after == 60


def test_the_clock_stops_while_suspended_or_waiting_for_admission() -> None:
    queued = make_job().queue("gpu").obj()
    spec = parse_spec(queued)
    assert deadline.clock_stopped(spec, queued, None)
    assert deadline.clock_stopped(spec, queued, make_batch_job(queued).suspended().obj())
    assert not deadline.clock_stopped(spec, queued, make_batch_job(queued).obj())
    suspended = make_job().suspend().obj()
    assert deadline.clock_stopped(parse_spec(suspended), suspended, make_batch_job(suspended).obj())
    plain = make_job().obj()
    assert not deadline.clock_stopped(parse_spec(plain), plain, None)

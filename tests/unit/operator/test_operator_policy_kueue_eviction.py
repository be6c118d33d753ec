"""Suspend policy: a Kueue-queued job that Kueue suspends again after admitting it (a preemption by the queue)."""

from __future__ import annotations

from tests.infra.wrappers import make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import after, cond, run


def test_kueue_eviction_after_admission_is_one_preemption_and_readmission_resumes() -> None:
    job = make_job().queue("gpu").no_preflight().obj()
    job = after(job, run(job))
    job = after(job, run(job, [make_batch_job(job).suspended().obj()], []))
    admitted = run(job, [make_batch_job(job).obj()], [make_pod(job).running().obj()])
    assert cond(admitted, "Queued") == ("False", "Admitted")
    job = after(job, admitted)

    # Kueue suspends the batch Job; its pod stops with exit 12 after a checkpoint (seen here or not).
    stopped = make_pod(job).exited(12).deleting().obj()
    evicted = run(job, [make_batch_job(job).suspended().obj()], [stopped])
    assert evicted.actions == []  # never unsuspended by the operator: Kueue readmits it
    assert evicted.status.phase == "Queued"
    assert cond(evicted, "Queued") == ("True", "Preempted")
    assert cond(evicted, "Running") == ("False", "Preempted")
    assert evicted.status.restarts.preemptions == 1  # the eviction, not also its pod
    job = after(job, evicted)

    # Still waiting: counted once.
    waiting = run(job, [make_batch_job(job).suspended().obj()], [])
    assert waiting.status.restarts.preemptions == 1
    assert cond(waiting, "Queued") == ("True", "Preempted")
    job = after(job, waiting)

    readmitted = run(job, [make_batch_job(job).obj()], [make_pod(job).running().obj()])
    assert cond(readmitted, "Queued") == ("False", "Admitted")
    assert readmitted.status.restarts.preemptions == 1


def test_a_user_resume_of_an_admitted_kueue_job_is_not_a_preemption() -> None:
    job = make_job().queue("gpu").no_preflight().obj()
    job = after(job, run(job))
    job = after(job, run(job, [make_batch_job(job).obj()], [make_pod(job).running().obj()]))
    job["spec"]["runPolicy"] = {"suspend": True}
    job = after(job, run(job, [make_batch_job(job).obj()], [make_pod(job).running().obj()]))
    job["spec"]["runPolicy"] = {"suspend": False}
    plan = run(job, [make_batch_job(job).suspended().obj()], [])
    assert plan.status.phase == "Queued"
    assert cond(plan, "Queued") == ("True", "WaitingForAdmission")
    assert plan.status.restarts.preemptions == 0

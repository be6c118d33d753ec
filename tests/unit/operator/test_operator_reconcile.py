"""The pure reconcile state machine: observed job + children -> status, actions, events.

The policies it applies have their own tests (test_operator_policy_*.py); these cover the reconcile's shape:
creating the first attempt, idempotence, stale objects, the phase from the pods, and children of other objects.
"""

from __future__ import annotations

from dreambooth_operator.handlers.jobs import batch_jobs_by_owner, pods_by_owner
from dreambooth_operator.observed import owned_batch_jobs
from dreambooth_operator.plan import Action, ActionKind
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import NOW, after, cond, reasons, run


def test_new_job_creates_attempt_zero() -> None:
    plan = run(make_job().no_preflight().obj())  # with the input check first: test_operator_policy_preflight.py
    assert plan.actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=0)]
    assert plan.status.phase == "Pending"
    assert plan.status.start_time == NOW
    assert plan.status.observed_generation == 1
    assert cond(plan, "Valid") == ("True", "SpecValid")
    assert reasons(plan) == []  # a valid spec is what every new job starts with: no event (test_operator_events.py)


def test_status_written_twice_is_stable_and_emits_no_new_events() -> None:
    job = make_job().obj()
    first = run(job)
    second = run(after(job, first), [make_batch_job(job).obj()], [make_pod(job).obj()])
    third = run(after(job, second), [make_batch_job(job).obj()], [make_pod(job).obj()])
    assert third.status == second.status
    assert third.events == []
    assert third.actions == []


def test_unschedulable_and_image_pull_are_reported() -> None:
    job = make_job().status(attempt=0, phase="Pending", startTime=iso(T0)).obj()
    plan = run(job, [make_batch_job(job).obj()], [make_pod(job).unschedulable().obj()])
    assert plan.status.phase == "Pending"
    assert cond(plan, "Running") == ("False", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in (plan.status.message or "")
    assert ("Warning", "Unschedulable") in reasons(plan)
    plan = run(job, [make_batch_job(job).obj()], [make_pod(job).image_pull("ErrImagePull", "not found").obj()])
    assert cond(plan, "Running") == ("False", "ImagePullFailed")
    assert "ErrImagePull: not found" in (plan.status.message or "")


def test_stale_generation_changes_nothing() -> None:
    job = make_job().generation(1).status(observedGeneration=2, phase="Running", attempt=0).obj()
    plan = run(job, [make_batch_job(job).complete().obj()], [])
    assert plan.actions == []
    assert plan.events == []
    assert plan.status.phase == "Running"


def test_a_finished_rank_keeps_the_phase_until_the_job_controller_completes_the_job() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0), progressText="20/20").obj()
    job["status"]["progress"] = {"step": 20, "totalSteps": 20, "stage": "Exporting", "updatedAt": iso(T0)}
    plan = run(job, [make_batch_job(job).obj()], [make_pod(job).exited(0, {"modelUri": "s3://bkt/m"}).obj()])
    assert plan.status.phase == "Running"
    assert cond(plan, "Running") == ("True", "Training")


def test_phase_stays_running_while_the_batch_job_counts_the_ranks_that_pods_do_not_show() -> None:
    progress = {"step": 20, "totalSteps": 20, "stage": "Exporting", "updatedAt": iso(T0)}
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0), progress=progress).obj()
    # The finished pod is gone (podgc) before the Job controller marks the Job Complete.
    gone = run(job, [make_batch_job(job).counters(succeeded=1).obj()], [])
    assert gone.status.phase == "Running"
    assert cond(gone, "Running") == ("True", "Training")
    # The running pod is not in the index yet; the Job controller counts it as active.
    init = make_job().status(attempt=0, phase="Initializing", startTime=iso(T0)).obj()
    assert run(init, [make_batch_job(init).counters(active=1).obj()], []).status.phase == "Initializing"
    assert run(init, [make_batch_job(init).counters(active=1, ready=1).obj()], []).status.phase == "Initializing"
    # A pod that is not running is a new cause: Pending.
    pending = make_pod(init, uid="p2").obj()
    assert run(init, [make_batch_job(init).counters(active=1, ready=1).obj()], [pending]).status.phase == "Pending"
    # A job that never ran does not jump ahead on the counters.
    fresh = make_job().status(attempt=0, phase="Pending", startTime=iso(T0)).obj()
    assert run(fresh, [make_batch_job(fresh).counters(active=1).obj()], []).status.phase == "Pending"


def test_children_of_an_earlier_job_with_the_same_name_are_not_adopted() -> None:
    job = make_job().obj()  # re-applied: a new uid, while the old object's children are still there
    old_job = make_batch_job(job).owner("uid-old").complete()
    old_pod = make_pod(job).exited(0, {"modelUri": "s3://old/model"}).obj()
    plan = run(job, [old_job.obj()], [old_pod])
    assert plan.status.phase == "Pending"
    assert plan.actions == []
    assert plan.requeue_after == 2.0
    assert "cat-a0" in (plan.status.message or "")
    assert "earlier" in (plan.status.message or "")
    deleting = run(job, [old_job.deleting().obj()], [old_pod])
    assert "to be deleted" in (deleting.status.message or "")
    # Once it is gone, attempt 0 is created; foreign Jobs of other attempts are neither waited for nor deleted.
    other = make_batch_job(job, 3).owner("uid-old").obj()
    other_pod = make_pod(job, 3, 0).owner("uid-cat-a3").running().obj()
    assert run(job, [other], [other_pod]).actions == [Action(ActionKind.CREATE_PREFLIGHT, name="cat-check")]
    assert owned_batch_jobs(job, [old_job.obj(), other, make_batch_job(job).obj()]) == [make_batch_job(job).obj()]
    # A pod of a foreign batch Job is not one of this job's pods.
    mine = after(job, plan) | {"status": {"attempt": 0, "phase": "Running", "startTime": iso(T0)}}
    foreign_pod = make_pod(job, uid="old").owner("uid-old-a0").exited(0).obj()
    assert run(mine, [make_batch_job(job).obj()], [foreign_pod]).status.phase == "Pending"


def test_the_child_indexes_keep_the_owner_references_that_adoption_checks() -> None:
    job = make_job().obj()
    for index, child in ((batch_jobs_by_owner, make_batch_job(job).obj()), (pods_by_owner, make_pod(job).obj())):
        entry = index(namespace="team-a", labels=child["metadata"]["labels"], body=child)
        assert entry[("team-a", "cat")]["metadata"]["ownerReferences"] == child["metadata"]["ownerReferences"]

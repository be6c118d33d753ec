"""The pure reconcile state machine: observed job + children -> status, actions, events."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from operator_wrappers import T0, iso, make_batch_job, make_job, make_pod

from dreambooth_operator.builders import parse_spec, pod_spec_hash
from dreambooth_operator.handlers import batch_jobs_by_owner, pods_by_owner, record_metrics
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.reconcile import (
    Action,
    ActionKind,
    Observed,
    Plan,
    ProgressSample,
    owned_batch_jobs,
    reconcile,
)

NOW = T0 + timedelta(seconds=30)


def run(
    job: dict[str, Any],
    batch_jobs: list[dict[str, Any]] | None = None,
    pods: list[dict[str, Any]] | None = None,
    now: Any = NOW,
    progress: ProgressSample | None = None,
) -> Plan:
    return reconcile(Observed(job=job, batch_jobs=batch_jobs or [], pods=pods or [], now=now, progress=progress))


def cond(plan: Plan, type_: str) -> tuple[str, str] | None:
    c = next((c for c in plan.status.conditions if c.type == type_), None)
    return (c.status.value, c.reason) if c else None


def reasons(plan: Plan) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in plan.events]


def after(job: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The job as it looks once the plan's status (and annotation) were written."""
    job = {**job, "status": plan.status_wire()}
    if plan.counted_pods is not None:
        import json

        job["metadata"] = {
            **job["metadata"],
            "annotations": {"dreambooth.dev/counted-preemptions": json.dumps(plan.counted_pods)},
        }
    return job


def test_new_job_creates_attempt_zero() -> None:
    plan = run(make_job().obj())
    assert plan.actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=0)]
    assert plan.status.phase == "Pending"
    assert plan.status.start_time == NOW
    assert plan.status.observed_generation == 1
    assert cond(plan, "Valid") == ("True", "SpecValid")
    assert reasons(plan) == [("Normal", "SpecValid")]


def test_invalid_spec_fails_without_children() -> None:
    plan = run(make_job("x" * 60).obj())
    assert plan.actions == []
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "InvalidSpec")
    assert ("Warning", "InvalidSpec") in reasons(plan)
    assert plan.finished


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


def test_an_attempt_that_cannot_start_is_replaced_when_the_pod_settings_change() -> None:
    """A wrong image (or a nodeSelector no node matches) keeps the pods from starting; fixing spec.podTemplate
    replaces the attempt at once, without counting a failure. A running attempt keeps its pods."""
    built_from = pod_spec_hash(parse_spec(make_job().obj()))
    fixed = make_job().pod_template(image="my/trainer:fixed").status(attempt=0, phase="Pending", startTime=iso(T0))
    job = fixed.obj()
    stale = make_batch_job(job).pod_spec_hash(built_from).obj()
    for pod in (make_pod(job).image_pull("ImagePullBackOff", "no such host"), make_pod(job).unschedulable()):
        plan = run(job, [stale], [pod.obj()])
        assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]
        assert plan.status.attempt == 1
        assert plan.status.phase == "Pending"
        assert cond(plan, "Running") == ("False", "PodSpecChanged")
        assert plan.status.restarts.total == 0
    # once the old attempt is gone, the next one is created from the new spec
    nxt = run(after(job, plan), [make_batch_job(job).deleting().pod_spec_hash(built_from).obj()], [])
    assert nxt.actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=1)]

    current = make_batch_job(job).pod_spec_hash(pod_spec_hash(parse_spec(job))).obj()
    unchanged = run(job, [current], [make_pod(job).image_pull("ErrImagePull", "not found").obj()])
    assert unchanged.actions == []
    assert cond(unchanged, "Running") == ("False", "ImagePullFailed")
    running = run(job, [stale], [make_pod(job).running().obj()])
    assert all(a.kind is not ActionKind.DELETE_BATCH_JOB for a in running.actions)
    assert running.status.attempt == 0


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
        data={
            "phase": "Training",
            "step": 5,
            "totalSteps": 10,
            "loss": 0.2,
            "stepsPerSecond": 2.0,
            "etaSeconds": 2.5,
            "lastCheckpoint": {"step": 4, "uri": "s3://b/ckpt/step-00000004", "time": iso(T0)},
        },
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
    stale = ProgressSample(0, pod["metadata"]["uid"], T0, {"phase": "Training", "step": 3, "totalSteps": 10}, NOW)
    again = run(after(job, plan), [make_batch_job(job).obj()], [pod], progress=stale)
    assert again.status.progress is not None
    assert again.status.progress.step == 5
    # A sample from another attempt is ignored.
    other = ProgressSample(1, pod["metadata"]["uid"], T0, {"step": 9, "totalSteps": 10}, NOW)
    assert run(after(job, plan), [make_batch_job(job).obj()], [pod], progress=other).status.progress_text == "5/10"


def test_steps_redone_after_restarts_are_counted_once_against_the_resumed_checkpoint() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    batch = [make_batch_job(job).obj()]

    def sample(pod: dict[str, Any], at: datetime, phase: str, step: int, resumed: int | None) -> ProgressSample:
        data = {"phase": phase, "step": step, "totalSteps": 100, "resumedFrom": resumed}
        return ProgressSample(0, pod["metadata"]["uid"], _started(pod), data, at)

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


def test_success_sets_outputs_and_is_sticky() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    message = {"status": "succeeded", "modelUri": "s3://bucket/out/cat/model", "steps": 10, "finalLoss": 0.1}
    plan = run(job, [make_batch_job(job).complete().obj()], [make_pod(job).exited(0, message).obj()])
    assert plan.status.phase == "Succeeded"
    assert plan.status.outputs is not None
    assert plan.status.outputs.model_uri == "s3://bucket/out/cat/model"
    assert plan.status.outputs.samples_uri == "s3://bucket/out/cat/samples"
    assert plan.status.completion_time == NOW
    assert plan.status.progress_text == "10/10"
    assert ("Normal", "TrainingCompleted") in reasons(plan)
    assert plan.finished
    # Terminal phases never change, whatever is observed later.
    later = run(after(job, plan), [make_batch_job(job).failed().obj()], [])
    assert later.status == plan.status
    assert later.events == []


def test_invalid_input_fails_at_once_with_the_trainer_message() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).exited(10, {"status": "failed", "reason": "InvalidInput", "message": "cat3.jpg is bad"})
    plan = run(job, [make_batch_job(job).failed("PodFailurePolicy", "x").obj()], [pod.obj()])
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "InvalidInput")
    assert plan.status.message == "cat3.jpg is bad"


def test_single_node_backoff_limit_exceeded() -> None:
    job = make_job().run_policy(backoffLimit=1).status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    batch = make_batch_job(job).failed().failed_count(2).obj()
    plan = run(job, [batch], [make_pod(job).exited(11).obj()])
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "BackoffLimitExceeded")
    assert plan.status.restarts.failures == 2
    assert plan.status.restarts.total == 2


def test_single_node_preemption_is_counted_once() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    evicted = make_pod(job, uid="p1").running().disrupted().deleting().obj()
    plan = run(job, [make_batch_job(job).obj()], [evicted])
    assert plan.status.restarts.preemptions == 1
    assert plan.counted_pods == ["p1"]
    assert cond(plan, "Running") == ("False", "Preempted")
    assert ("Warning", "Preempted") in reasons(plan)
    replacement = make_pod(job, uid="p2").running().obj()
    again = run(after(job, plan), [make_batch_job(job).obj()], [evicted, replacement])
    assert again.status.restarts.preemptions == 1
    assert again.counted_pods is None
    assert again.status.phase == "Initializing"
    assert cond(again, "Running") == ("True", "Resumed")


def test_multi_node_gang_restart_waits_for_old_pods_then_creates_the_next_attempt() -> None:
    job = make_job().nodes(2).status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    rank0 = make_pod(job, 0, 0).running().obj()
    rank1 = make_pod(job, 0, 1).running().disrupted().deleting().obj()
    plan = run(job, [make_batch_job(job, 0).obj()], [rank0, rank1])
    assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]
    assert plan.status.attempt == 1
    assert plan.status.restarts.preemptions == 1
    assert plan.status.restarts.failures == 0
    assert cond(plan, "Running") == ("False", "Preempted")
    job = after(job, plan)
    # The old attempt is still stopping (its pods write a checkpoint): wait.
    waiting = run(job, [make_batch_job(job, 0).deleting().obj()], [rank0])
    assert waiting.actions == []
    assert waiting.status.attempt == 1
    assert waiting.status.restarts.preemptions == 1
    # Old pods gone: create attempt 1.
    plan = run(job, [], [])
    assert plan.actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=1)]


def test_multi_node_failures_count_against_backoff_limit() -> None:
    job = make_job().nodes(2).run_policy(backoffLimit=1)
    job = job.status(attempt=1, phase="Running", startTime=iso(T0), restarts={"failures": 1, "total": 1}).obj()
    plan = run(job, [make_batch_job(job, 1).obj()], [make_pod(job, 1, 0).exited(11, "nccl timeout").obj()])
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "BackoffLimitExceeded")
    assert "nccl timeout" in (plan.status.message or "")
    assert Action(ActionKind.DELETE_BATCH_JOB, name="cat-a1") in plan.actions


def test_suspend_and_resume() -> None:
    job = make_job().suspend().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    plan = run(job, [make_batch_job(job).obj()], [make_pod(job).running().obj()])
    assert plan.actions == [Action(ActionKind.SET_SUSPEND, name="cat-a0", suspend=True)]
    assert plan.status.phase == "Suspended"
    assert cond(plan, "Suspended") == ("True", "SuspendedByUser")
    resumed_job = after(job, plan)
    resumed_job["spec"]["runPolicy"]["suspend"] = False
    later = NOW + timedelta(seconds=100)
    plan = run(resumed_job, [make_batch_job(job).suspended().obj()], [], now=later)
    assert plan.actions == [Action(ActionKind.SET_SUSPEND, name="cat-a0", suspend=False)]
    assert cond(plan, "Suspended") == ("False", "Resumed")
    assert ("Normal", "Resumed") in reasons(plan)
    assert plan.status.start_time == later  # suspended time does not count against the deadline


def test_kueue_job_is_queued_until_admitted() -> None:
    job = make_job().queue("gpu").obj()
    plan = run(job)
    assert plan.actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=0)]
    assert plan.status.phase == "Queued"
    job = after(job, plan)
    plan = run(job, [make_batch_job(job).suspended().obj()], [])
    assert plan.actions == []
    assert plan.status.phase == "Queued"
    assert cond(plan, "Queued") == ("True", "WaitingForAdmission")
    plan = run(after(job, plan), [make_batch_job(job).obj()], [make_pod(job).obj()])
    assert plan.status.phase == "Pending"
    assert cond(plan, "Queued") == ("False", "Admitted")


def test_deadline_exceeded_stops_the_pods_and_fails() -> None:
    job = make_job().run_policy(activeDeadlineSeconds=20).status(attempt=0, phase="Running", startTime=iso(T0))
    plan = run(job.obj(), [make_batch_job(job.obj()).obj()], [make_pod(job.obj()).running().obj()])
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "DeadlineExceeded")
    assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]
    early = run(job.obj(), [make_batch_job(job.obj()).obj()], [], now=T0 + timedelta(seconds=5))
    assert early.requeue_after == 15


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


def test_pods_stopped_by_a_suspend_are_not_preemptions() -> None:
    job = make_job().suspend().status(attempt=0, phase="Suspended", startTime=iso(T0)).obj()
    stopped = make_pod(job, uid="p1").exited(12, {"status": "preempted"}).obj()
    plan = run(job, [make_batch_job(job).suspended().obj()], [stopped])
    assert plan.status.restarts.preemptions == 0
    assert plan.counted_pods == ["p1"]
    resumed = after(job, plan)
    resumed["spec"]["runPolicy"]["suspend"] = False
    again = run(resumed, [make_batch_job(job).suspended().obj()], [stopped])
    assert again.status.restarts.preemptions == 0


def test_a_preempted_rank_and_its_peer_crashing_on_the_broken_collective_count_as_one_preemption() -> None:
    job = make_job().nodes(2).run_policy(backoffLimit=0).status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    peer = make_pod(job, 0, 0).exited(11, "gloo: connection reset by peer").obj()
    reclaimed = make_pod(job, 0, 1).running().disrupted().deleting().obj()
    plan = run(job, [make_batch_job(job, 0).obj()], [peer, reclaimed])
    assert plan.status.phase == "Pending"
    assert plan.status.attempt == 1
    assert (plan.status.restarts.preemptions, plan.status.restarts.failures) == (1, 0)
    assert cond(plan, "Running") == ("False", "Preempted")
    assert "rank 1 (pod cat-a0-1-abcde) was preempted" in (plan.status.message or "")
    assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]


def test_time_queued_for_admission_does_not_count_against_the_deadline() -> None:
    job = make_job().queue("gpu").run_policy(activeDeadlineSeconds=3600).obj()
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


def test_older_attempt_pods_stuck_deleting_on_a_lost_node_are_force_deleted() -> None:
    job = make_job().nodes(2).status(attempt=1, phase="Pending", startTime=iso(T0)).obj()
    old_job = make_batch_job(job, 0).deleting().obj()
    stuck = make_pod(job, 0, 1).running().deleting(at=T0).obj()
    waiting = run(job, [old_job], [stuck], now=T0 + timedelta(seconds=10))
    assert waiting.actions == []
    assert waiting.status.phase == "Pending"
    assert "cat-a0-1-abcde" in (waiting.status.message or "")
    assert "force-deleted" in (waiting.status.message or "")
    assert waiting.requeue_after == 2.0
    forced = run(job, [old_job], [stuck], now=T0 + timedelta(seconds=31))
    assert forced.actions == [
        Action(ActionKind.FORCE_DELETE_POD, name="cat-a0-1-abcde", uid="pod-cat-a0-1"),
        Action(ActionKind.CREATE_ATTEMPT, attempt=1),
    ]
    assert cond(forced, "Running") == ("False", "StuckPodsForceDeleted")
    assert ("Warning", "StuckPodsForceDeleted") in reasons(forced)
    assert "force-deleted 1 pod(s)" in (forced.status.message or "")
    # A pod whose deletion was not requested yet is waited for (the batch Job's deletion reaches it first).
    alive = make_pod(job, 0, 0).running().obj()
    assert run(job, [old_job], [alive, stuck], now=T0 + timedelta(days=1)).actions == []


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
    assert run(job, [other], [other_pod]).actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=0)]
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


def test_running_attempt_pods_stuck_deleting_on_a_lost_node_are_force_deleted() -> None:
    """A single-node Job replaces an evicted pod only once it is gone (podReplacementPolicy Failed): on a lost node
    that never happens by itself."""
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    batch = make_batch_job(job).obj()
    evicted = make_pod(job, 0, 0).running().deleting(at=T0).obj()
    early = run(job, [batch], [evicted], now=T0 + timedelta(seconds=10))
    assert early.actions == []
    assert early.requeue_after is not None
    assert early.requeue_after <= 20.0
    late = run(job, [batch], [evicted], now=T0 + timedelta(seconds=31))
    assert late.actions == [Action(ActionKind.FORCE_DELETE_POD, name="cat-a0-0-abcde", uid="pod-cat-a0-0")]
    assert cond(late, "Running") == ("False", "StuckPodsForceDeleted")
    assert ("Warning", "StuckPodsForceDeleted") in reasons(late)
    # A running pod that nobody deletes is left alone.
    alive = make_pod(job, 0, 0).running().obj()
    assert run(job, [batch], [alive], now=T0 + timedelta(days=1)).actions == []

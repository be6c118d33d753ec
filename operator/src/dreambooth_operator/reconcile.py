"""The pure state machine of a DreamBoothJob (one reconcile, in the shape of JobSet's controller).

observe (the job, its batch Jobs and pods, rank 0's progress) -> classify -> apply the policies (validation,
deadline, success, failure/gang restart, suspend, TTL) -> decide the children to create or delete -> compute
the new status once. The handler carries out the actions, writes the status, and only then emits the events.

Status never goes backwards: terminal phases are sticky, the attempt and restart counters only grow, a stale
object (an older generation than the status has seen) changes nothing, and a condition keeps its transition
time while its status stays the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from pydantic import ValidationError

from dreambooth_api.common import Condition, find_condition, set_condition
from dreambooth_api.constants import (
    ANNOTATION_POD_SPEC_HASH,
    LABEL_ATTEMPT,
    TERMINAL_JOB_PHASES,
    ConditionStatus,
    JobConditionType,
    JobPhase,
    Reason,
)
from dreambooth_api.job import CheckpointRef, DreamBoothJobSpec, DreamBoothJobStatus, Outputs, Progress
from dreambooth_api.job import progress_text as format_progress
from dreambooth_operator import names, podstate, usage
from dreambooth_operator.builders import is_queued_by_kueue, pod_spec_hash
from dreambooth_operator.policies import budget, deadline, failure, success, suspend, ttl
from dreambooth_operator.validation import validate

# Annotation on the DreamBoothJob: UIDs of single-node pods already counted as preempted (bounded list), so
# that an operator restart does not count them twice.
COUNTED_PODS_ANNOTATION: Final = "dreambooth.dev/counted-preemptions"
COUNTED_PODS_KEEP: Final = 32
TRAINING_STAGES: Final = frozenset({"Training", "Checkpointing", "Exporting", "Succeeded"})
STUCK_POD_MARGIN_SECONDS: Final = 30.0
"""How long past its deletionTimestamp (the deletion request plus the grace period, when the kubelet should have
stopped it) a pod of an older attempt may hold up the next attempt; then its node is lost and it is force-deleted."""
STUCK_PODS_FORCE_DELETED: Final = "StuckPodsForceDeleted"
"""Condition and event reason: pods of the previous attempt stuck deleting were force-deleted."""


@dataclass(frozen=True)
class ProgressSample:
    """One /progress document read from rank 0 of `attempt`."""

    attempt: int
    pod_uid: str
    pod_start: datetime | None
    data: Mapping[str, Any]
    at: datetime


@dataclass(frozen=True)
class Observed:
    job: Mapping[str, Any]
    batch_jobs: list[Mapping[str, Any]]
    pods: list[Mapping[str, Any]]
    now: datetime
    progress: ProgressSample | None = None
    gone_pods: list[Mapping[str, Any]] = field(default_factory=list)
    """The last states of the job's pods deleted since the last reconcile (watch DELETED events): usage only."""


class ActionKind(StrEnum):
    CREATE_ATTEMPT = "CreateAttempt"
    """Ensure the ConfigMap and Service, then create the batch Job of `attempt`."""
    DELETE_BATCH_JOB = "DeleteBatchJob"
    """Delete batch Job `name` (Foreground: the Job goes once its pods have stopped)."""
    SET_SUSPEND = "SetSuspend"
    """Set batch Job `name`'s spec.suspend to `suspend`."""
    DELETE_CHILDREN = "DeleteChildren"
    """TTL: delete every batch Job, the Service and the ConfigMap of the job."""
    FORCE_DELETE_POD = "ForceDeletePod"
    """Delete pod `name` (precondition: `uid`) with gracePeriodSeconds=0: it is stuck deleting on a lost node."""


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    name: str = ""
    attempt: int = 0
    suspend: bool = False
    uid: str = ""


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: DreamBoothJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    counted_pods: list[str] | None = None
    """The new value of COUNTED_PODS_ANNOTATION, when it changed."""
    requeue_after: float | None = None
    """Reconcile again after this many seconds at the latest (deadline, TTL)."""
    finished: bool = False
    """Nothing is left to do for this job (terminal, and its TTL done or absent)."""

    def status_wire(self) -> dict[str, Any]:
        return self.status.to_wire()


def parse_status(job: Mapping[str, Any]) -> DreamBoothJobStatus:
    raw = dict(job.get("status") or {})
    try:
        return DreamBoothJobStatus.model_validate(raw)
    except ValidationError:
        # A hand-edited or foreign status: keep what the counters need, start the rest afresh.
        return DreamBoothJobStatus(attempt=int(raw.get("attempt") or 0))


def owned_batch_jobs(job: Mapping[str, Any], batch_jobs: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The batch Jobs this DreamBoothJob object controls (by uid): not those of an earlier object with the same
    name that are still being garbage-collected. All of them when the job has no uid (never from the API)."""
    uid = (job.get("metadata") or {}).get("uid")
    return [j for j in batch_jobs if not uid or podstate.controller_uid(j) == str(uid)]


def _owned(obs: Observed) -> tuple[Observed, list[Mapping[str, Any]]]:
    """The observation cut down to this object's children (pods: those of an owned batch Job), and the
    foreign batch Jobs that carry the job's label."""
    if not (obs.job.get("metadata") or {}).get("uid"):
        return obs, []
    owned = owned_batch_jobs(obs.job, obs.batch_jobs)
    uids = {str(j["metadata"].get("uid")) for j in owned}
    foreign = [j for j in obs.batch_jobs if str(j["metadata"].get("uid")) not in uids]
    pods = [p for p in obs.pods if podstate.controller_uid(p) in uids]
    return replace(obs, batch_jobs=owned, pods=pods), foreign


def _attempt_of(obj: Mapping[str, Any]) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_ATTEMPT)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _Builder:
    """Accumulates the new status, the actions and the events of one reconcile."""

    def __init__(self, obs: Observed, prev: DreamBoothJobStatus, generation: int | None) -> None:
        self.obs = obs
        self.prev = prev
        self.generation = generation
        self.status = prev.model_copy(deep=True)
        self.status.observed_generation = generation
        self.actions: list[Action] = []
        self.events: list[Event] = []
        self.requeue: list[float] = []

    def condition(self, type_: JobConditionType, status: bool, reason: str, message: str = "") -> None:
        new = Condition(
            type=type_.value,
            status=ConditionStatus.TRUE if status else ConditionStatus.FALSE,
            reason=reason,
            message=message[:32768],
            last_transition_time=self.obs.now,
            observed_generation=self.generation,
        )
        old = find_condition(self.status.conditions, type_.value)
        if (
            old is not None
            and old.observed_generation is not None
            and self.generation is not None
            and old.observed_generation > self.generation
        ):
            return  # never let a stale observation overwrite a newer condition
        self.status.conditions = set_condition(self.status.conditions, new)

    def phase(self, phase: JobPhase, message: str | None = None) -> None:
        self.status.phase = phase
        self.status.message = message[:4096] if message else None

    def fail(self, reason: str, message: str) -> None:
        self.phase(JobPhase.FAILED, message)
        self.condition(JobConditionType.FAILED, True, reason, message)
        self.condition(JobConditionType.RUNNING, False, reason, message)
        if self.status.completion_time is None:
            self.status.completion_time = self.obs.now

    def plan(self, counted: list[str] | None = None, finished: bool = False) -> Plan:
        self.status.restarts.total = self.status.restarts.preemptions + self.status.restarts.failures
        self.events.extend(_transition_events(self.prev, self.status))
        return Plan(
            status=self.status,
            actions=self.actions,
            events=self.events,
            counted_pods=counted,
            requeue_after=max(0.0, min(self.requeue)) if self.requeue else None,
            finished=finished,
        )


_WARNING_REASONS: Final = frozenset(
    {
        Reason.INVALID_SPEC,
        Reason.INVALID_INPUT,
        Reason.PREEMPTED,
        Reason.RETRYING,
        Reason.BACKOFF_LIMIT_EXCEEDED,
        Reason.DEADLINE_EXCEEDED,
        Reason.GPU_SECONDS_LIMIT_EXCEEDED,
        Reason.UNSCHEDULABLE,
        Reason.IMAGE_PULL_FAILED,
        STUCK_PODS_FORCE_DELETED,
    }
)


def _transition_events(prev: DreamBoothJobStatus, new: DreamBoothJobStatus) -> list[Event]:
    """One event per condition whose status or reason changed in this reconcile."""
    events = []
    for cond in new.conditions:
        old = find_condition(prev.conditions, cond.type)
        if old is not None and old.status == cond.status and old.reason == cond.reason:
            continue
        if old is None and cond.status == ConditionStatus.FALSE and cond.reason == Reason.PODS_PENDING:
            continue  # a job that starts out with pending pods is not news
        kind = "Warning" if cond.reason in _WARNING_REASONS and cond.status == ConditionStatus.TRUE else "Normal"
        if cond.type == JobConditionType.RUNNING and cond.reason in _WARNING_REASONS:
            kind = "Warning"
        text = cond.message or f"{cond.type} is {cond.status.value}"
        events.append(Event(kind, cond.reason, text))
    return events


def reconcile(obs: Observed) -> Plan:  # noqa: PLR0911 - one early return per policy, read top to bottom
    """Compute the next status and the actions for one DreamBoothJob."""
    job = obs.job
    meta = job.get("metadata") or {}
    name = str(meta.get("name"))
    generation = meta.get("generation")
    prev = parse_status(job)
    obs, foreign = _owned(obs)
    b = _Builder(obs, prev, generation)

    # A stale body (older than what the status already reflects) must not change anything.
    if prev.observed_generation is not None and generation is not None and generation < prev.observed_generation:
        b.status = prev
        return Plan(status=prev, requeue_after=None)

    if obs.pods or prev.usage is not None:
        b.status.usage = usage.account(prev.usage, obs.pods, usage.gpus_per_pod(job), obs.now, obs.gone_pods)

    if prev.phase in TERMINAL_JOB_PHASES:
        return _finished(b, name)

    errors = validate(job)
    if errors:
        message = "; ".join(errors)
        b.condition(JobConditionType.VALID, False, Reason.INVALID_SPEC, message)
        b.fail(Reason.INVALID_SPEC, message)
        return _finished(b, name)
    spec = DreamBoothJobSpec.model_validate(job.get("spec") or {})
    b.condition(JobConditionType.VALID, True, Reason.SPEC_VALID, "the spec is valid")

    attempt = prev.attempt
    current_name = names.batch_job_name(name, attempt)
    current = next((j for j in obs.batch_jobs if j["metadata"]["name"] == current_name), None)
    current_pods = [p for p in obs.pods if _attempt_of(p) == attempt]
    older_active = [p for p in obs.pods if (_attempt_of(p) or 0) < attempt and podstate.is_active(p)]
    for old in obs.batch_jobs:
        old_attempt = _attempt_of(old)
        if old_attempt is not None and old_attempt < attempt and not podstate.is_deleting(old):
            b.actions.append(Action(ActionKind.DELETE_BATCH_JOB, name=old["metadata"]["name"]))

    counted = _count_single_node_preemptions(b, spec, current_pods, job)
    if current is not None and spec.resources.nodes == 1:
        b.status.restarts.failures = max(b.status.restarts.failures, podstate.job_failed_count(current))

    _progress(b, obs.progress, attempt, current_pods)

    if _deadline_passed(b, spec, current, current_name):
        return _finished(b, name, counted)

    outcome = _outcome(b, spec, name, current, current_name, current_pods, counted)
    if outcome is not None:
        return outcome

    if _gpu_budget_spent(b, spec, current, current_name):
        return _finished(b, name, counted)

    if current is None:
        blocker = next((j for j in foreign if j["metadata"]["name"] == current_name), None)
        if blocker is not None:
            return _wait_for_foreign_child(b, blocker, counted)
        return _start_attempt(b, spec, attempt, older_active, counted)

    return _running(b, spec, current, current_pods, counted)


def _deadline_passed(
    b: _Builder, spec: DreamBoothJobSpec, current: Mapping[str, Any] | None, current_name: str
) -> bool:
    """activeDeadlineSeconds, counted from startTime: set (or reset) when the job runs after a suspend or an
    admission; the clock stops while the job is held. Past the deadline the attempt is stopped and the job fails."""
    if _clock_stopped(spec, b.obs.job, current):
        return False
    if b.status.start_time is None or b.prev.phase in (JobPhase.QUEUED, JobPhase.SUSPENDED):
        b.status.start_time = b.obs.now
    seconds = spec.run_policy.active_deadline_seconds
    left = deadline.remaining_seconds(b.status.start_time, seconds, b.obs.now)
    if left is None:
        return False
    if left > 0:
        b.requeue.append(left)
        return False
    if current is not None and not podstate.is_deleting(current):
        b.actions.append(Action(ActionKind.DELETE_BATCH_JOB, name=current_name))
    b.fail(Reason.DEADLINE_EXCEEDED, f"the job ran longer than activeDeadlineSeconds ({seconds}s)")
    return True


def _gpu_budget_spent(
    b: _Builder, spec: DreamBoothJobSpec, current: Mapping[str, Any] | None, current_name: str
) -> bool:
    """runPolicy.gpuSecondsLimit: past it, the attempt is stopped and the job fails; before it, reconcile again
    when the GPUs held now would spend the rest."""
    limit = spec.run_policy.gpu_seconds_limit
    if limit is None or b.status.usage is None:
        return False
    obs = b.obs
    left = budget.remaining_gpu_seconds(limit, usage.live_gpu_seconds(b.status.usage, obs.pods, obs.now))
    if left is None:
        return False
    if left > 0:
        wait = budget.seconds_until_spent(left, usage.gpus_held(b.status.usage, obs.pods))
        if wait is not None:
            b.requeue.append(wait)
        return False
    # The figure to show: counted up to now, not to the last REFRESH_SECONDS step.
    b.status.usage = usage.account(
        b.prev.usage, obs.pods, b.status.usage.gpus_per_pod, obs.now, obs.gone_pods, refresh=True
    )
    if current is not None and not podstate.is_deleting(current):
        b.actions.append(Action(ActionKind.DELETE_BATCH_JOB, name=current_name))
    checkpoint = b.status.last_checkpoint
    kept = f"; the last checkpoint (step {checkpoint.step}) stays at {checkpoint.uri}" if checkpoint else ""
    b.fail(
        Reason.GPU_SECONDS_LIMIT_EXCEEDED,
        f"the job's pods used {b.status.usage.gpu_seconds} GPU-seconds, reaching runPolicy.gpuSecondsLimit "
        f"({limit}){kept}",
    )
    return True


def _clock_stopped(spec: DreamBoothJobSpec, job: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """The deadline clock does not run: the user suspended the job, or its attempt is (to be) created suspended
    for a queue and is not admitted yet."""
    if spec.run_policy.suspend:
        return True
    return is_queued_by_kueue(job) and (current is None or podstate.job_suspended(current))


def _wait_for_foreign_child(b: _Builder, blocker: Mapping[str, Any], counted: list[str] | None) -> Plan:
    """A batch Job with this attempt's name belongs to another object (an earlier DreamBoothJob of the same
    name): never adopt it; wait until it is gone."""
    name = blocker["metadata"]["name"]
    if podstate.is_deleting(blocker):
        message = f"waiting for the batch Job {name} of an earlier object with this name to be deleted"
    else:
        message = f"the batch Job {name} belongs to another object (an earlier job with this name); delete it"
    b.phase(JobPhase.PENDING, message)
    b.requeue.append(2.0)
    return b.plan(counted)


def _outcome(
    b: _Builder,
    spec: DreamBoothJobSpec,
    name: str,
    current: Mapping[str, Any] | None,
    current_name: str,
    current_pods: list[Mapping[str, Any]],
    counted: list[str] | None,
) -> Plan | None:
    """Success, invalid input, a gang failure, or a failed batch Job: the plan, or None to carry on."""
    obs = b.obs
    finished = podstate.job_finished(current) if current is not None else None
    if success.succeeded(current):
        result = success.rank0_result(current_pods)
        b.status.outputs = Outputs.model_validate(success.outputs(result, spec.output.get("uri")))
        if isinstance(result.get("lastCheckpoint"), Mapping):
            _checkpoint(b, result["lastCheckpoint"])
        steps = result.get("steps")
        if isinstance(steps, int):
            total = b.status.progress.total_steps if b.status.progress else steps
            b.status.progress = (b.status.progress or Progress()).model_copy(
                update={"step": steps, "total_steps": max(total, steps), "stage": "Succeeded", "updated_at": obs.now}
            )
            b.status.progress_text = format_progress(steps, max(total, steps))
        if isinstance(result.get("finalLoss"), int | float) and b.status.progress is not None:
            b.status.progress.loss = float(result["finalLoss"])
        b.phase(JobPhase.SUCCEEDED, f"the model is at {b.status.outputs.model_uri}")
        b.condition(JobConditionType.SUCCEEDED, True, Reason.TRAINING_COMPLETED, b.status.message or "")
        b.condition(JobConditionType.RUNNING, False, Reason.TRAINING_COMPLETED, "training completed")
        b.status.completion_time = b.status.completion_time or obs.now
        return _finished(b, name, counted)

    # Invalid input ends the job whatever the number of nodes.
    invalid = next((p for p in current_pods if failure.classify(p) is failure.FailureKind.INVALID_INPUT), None)
    if invalid is not None:
        detail = podstate.termination_message(invalid).get("message") or "the trainer rejected its input"
        if current is not None and spec.resources.nodes > 1 and not podstate.is_deleting(current):
            b.actions.append(Action(ActionKind.DELETE_BATCH_JOB, name=current_name))
        b.fail(Reason.INVALID_INPUT, str(detail))
        return _finished(b, name, counted)

    if spec.resources.nodes > 1:
        gang = failure.gang_failure(current_pods)
        if gang is not None and not spec.run_policy.suspend:
            return _gang_restart(b, spec, gang, current, current_name, counted)

    if finished is not None and finished[0] == "Failed":
        reason = str(finished[1].get("reason") or "")
        message = str(finished[1].get("message") or "the batch Job failed")
        if reason == "DeadlineExceeded":
            b.fail(Reason.DEADLINE_EXCEEDED, message)
        else:
            b.fail(
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"{b.status.restarts.failures} failures exceeded backoffLimit {spec.run_policy.backoff_limit}: "
                f"{message}",
            )
        return _finished(b, name, counted)

    return None


def _finished(b: _Builder, name: str, counted: list[str] | None = None) -> Plan:
    """Terminal: apply the TTL policy, nothing else changes.

    The TTL deletes the batch Jobs (and so the pods), the Service and the ConfigMap once, and records that in
    the Running condition (reason ChildDeleted), so that the loop knows it is done after a restart too.
    """
    spec_raw = b.obs.job.get("spec") or {}
    ttl_seconds = (spec_raw.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    left = ttl.remaining_seconds(b.status.completion_time, ttl_seconds, b.obs.now)
    running = find_condition(b.status.conditions, JobConditionType.RUNNING.value)
    cleaned = running is not None and running.reason == Reason.CHILD_DELETED
    if left is None or (cleaned and not b.obs.batch_jobs):
        return b.plan(counted, finished=True)
    if left > 0:
        b.requeue.append(left)
        return b.plan(counted)
    b.actions.append(Action(ActionKind.DELETE_CHILDREN, name=name))
    b.condition(
        JobConditionType.RUNNING,
        False,
        Reason.CHILD_DELETED,
        f"ttlSecondsAfterFinished ({ttl_seconds}s) passed: deleted the batch Job, pods, Service and ConfigMap",
    )
    b.requeue.append(2.0)
    return b.plan(counted)


def _count_single_node_preemptions(
    b: _Builder, spec: DreamBoothJobSpec, pods: list[Mapping[str, Any]], job: Mapping[str, Any]
) -> list[str] | None:
    """Single-node jobs: the Job controller replaces preempted pods; count each such pod once."""
    if spec.resources.nodes != 1:
        return None
    raw = (job.get("metadata", {}).get("annotations") or {}).get(COUNTED_PODS_ANNOTATION) or "[]"
    try:
        counted = [str(u) for u in json.loads(raw)]
    except (json.JSONDecodeError, TypeError):
        counted = []
    new = [
        podstate.pod_uid(p)
        for p in pods
        if failure.classify(p) is failure.FailureKind.PREEMPTED and podstate.pod_uid(p) not in counted
    ]
    if not new:
        return None
    if spec.run_policy.suspend:
        # Pods that the Job controller stops for a user's suspend exit 12 too: remembered, not counted.
        return (counted + new)[-COUNTED_PODS_KEEP:]
    b.status.restarts.preemptions += len(new)
    b.condition(
        JobConditionType.RUNNING,
        False,
        Reason.PREEMPTED,
        f"{len(new)} pod(s) preempted; the Job controller replaces them and training resumes from the last checkpoint",
    )
    return (counted + new)[-COUNTED_PODS_KEEP:]


def _checkpoint(b: _Builder, raw: Mapping[str, Any]) -> None:
    try:
        ref = CheckpointRef.model_validate(raw)
    except ValidationError:
        return
    prev = b.status.last_checkpoint
    if prev is not None and prev.step > ref.step:
        return
    b.status.last_checkpoint = ref
    b.condition(JobConditionType.CHECKPOINTED, True, Reason.CHECKPOINT_WRITTEN, f"step {ref.step} at {ref.uri}")


# Stages the trainer reports once it has restored its checkpoint (/progress `phase`, docs/contracts.md).
RESUMED_STAGES: Final = frozenset({"Training", "Checkpointing", "Exporting", "Succeeded"})


def _progress(b: _Builder, sample: ProgressSample | None, attempt: int, current_pods: list[Mapping[str, Any]]) -> None:
    """Take rank 0's /progress when it is from this attempt and does not go back (except after a restart)."""
    if sample is None or sample.attempt != attempt:
        return
    rank0 = next((p for p in current_pods if podstate.pod_uid(p) == sample.pod_uid), None)
    if rank0 is None:
        return
    data = sample.data
    step = data.get("step")
    if not isinstance(step, int) or step < 0:
        return
    prev = b.status.progress
    restarted = (
        prev is not None
        and prev.updated_at is not None
        and sample.pod_start is not None
        and sample.pod_start > prev.updated_at
    )
    if prev is not None and step < prev.step and not restarted:
        return
    if prev is not None and prev.updated_at is not None and sample.at < prev.updated_at:
        return
    total = data.get("totalSteps") if isinstance(data.get("totalSteps"), int) else (prev.total_steps if prev else 0)

    def num(key: str) -> float | None:
        value = data.get(key)
        return (
            float(value)
            if (isinstance(value, int | float) and value >= 0) or (key == "loss" and isinstance(value, int | float))
            else None
        )

    phase = data.get("phase")
    if restarted and prev is not None and phase is not None and phase not in RESUMED_STAGES:
        # A restarted pod that has not restored its checkpoint yet: keep the last step seen before the restart (and
        # its time, so that the restart is still recognised), and show the new pod's stage.
        b.status.progress = prev.model_copy(update={"stage": str(phase)[:64], "steps_per_second": None})
        return
    redone = prev.steps_redone if prev is not None else 0
    if restarted and prev is not None:
        # The restarted pod's first sample since it resumed: the steps between its checkpoint (resumedFrom; null
        # when it started from step 0; absent from older trainers) and the last step seen before the restart.
        resumed = data.get("resumedFrom", step)
        redone += max(0, prev.step - (resumed if isinstance(resumed, int) and resumed >= 0 else 0))
    b.status.progress = Progress(
        step=step,
        steps_redone=redone,
        total_steps=max(int(total or 0), 0),
        loss=num("loss"),
        steps_per_second=num("stepsPerSecond"),
        eta_seconds=num("etaSeconds"),
        stage=str(data["phase"])[:64] if data.get("phase") else None,
        updated_at=sample.at,
    )
    b.status.progress_text = format_progress(step, int(total or 0))
    if isinstance(data.get("lastCheckpoint"), Mapping):
        _checkpoint(b, data["lastCheckpoint"])


def _gang_restart(
    b: _Builder,
    spec: DreamBoothJobSpec,
    gang: failure.GangFailure,
    current: Mapping[str, Any] | None,
    current_name: str,
    counted: list[str] | None,
) -> Plan:
    """A rank of a multi-node attempt failed: stop the whole attempt, and start the next one (or fail)."""
    if current is not None and not podstate.is_deleting(current):
        b.actions.append(Action(ActionKind.DELETE_BATCH_JOB, name=current_name))
    if gang.kind is failure.FailureKind.PREEMPTED:
        b.status.restarts.preemptions += 1
        reason = Reason.PREEMPTED
    else:
        b.status.restarts.failures += 1
        reason = Reason.RETRYING
        if failure.exceeds_backoff(b.status.restarts.failures, spec.run_policy.backoff_limit):
            b.fail(
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"{b.status.restarts.failures} failures exceeded backoffLimit {spec.run_policy.backoff_limit}: "
                f"{gang.message}",
            )
            return _finished(b, str(b.obs.job["metadata"]["name"]), counted)
    b.status.attempt += 1
    message = f"attempt {b.status.attempt - 1}: {gang.message}; restarting the gang as attempt {b.status.attempt}"
    b.phase(JobPhase.PENDING, message)
    b.condition(JobConditionType.RUNNING, False, reason, message)
    b.requeue.append(1.0)
    return b.plan(counted)


def _pod_spec_changed(batch_job: Mapping[str, Any], spec: DreamBoothJobSpec) -> bool:
    """The user changed spec.podTemplate or spec.storage since this attempt was created (unknown: unchanged)."""
    built = (batch_job.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_POD_SPEC_HASH)
    return built is not None and built != pod_spec_hash(spec)


def _replace_stuck_attempt(b: _Builder, current_name: str, stuck: str, counted: list[str] | None) -> Plan:
    """The attempt's pods cannot start (image pull or scheduling) and the user has since changed the pod settings:
    replace the attempt with one built from the new spec, without counting a failure. No pod has run, so no
    training is lost; a running attempt keeps its pods and the change applies from the next attempt."""
    b.actions.append(Action(ActionKind.DELETE_BATCH_JOB, name=current_name))
    b.status.attempt += 1
    message = (
        f"spec.podTemplate or spec.storage changed while attempt {b.status.attempt - 1} could not start ({stuck}); "
        f"starting attempt {b.status.attempt} with the new settings"
    )
    b.phase(JobPhase.PENDING, message)
    b.condition(JobConditionType.RUNNING, False, Reason.POD_SPEC_CHANGED, message)
    b.requeue.append(1.0)
    return b.plan(counted)


def _stuck_since(pod: Mapping[str, Any]) -> datetime | None:
    """When a deleting pod counts as stuck (its node is lost): its deletionTimestamp plus the margin."""
    at = podstate.deletion_time(pod)
    return at + timedelta(seconds=STUCK_POD_MARGIN_SECONDS) if at is not None else None


def _pod_names(pods: list[Mapping[str, Any]], limit: int = 3) -> str:
    names_ = [str(p.get("metadata", {}).get("name")) for p in pods]
    more = f" and {len(names_) - limit} more" if len(names_) > limit else ""
    return ", ".join(names_[:limit]) + more


def _waiting_message(pods: list[Mapping[str, Any]]) -> str:
    forced = [t for p in pods if (t := _stuck_since(p)) is not None]
    text = f"waiting for {len(pods)} pod(s) of the previous attempt to stop (last checkpoint): {_pod_names(pods)}"
    if forced:
        text += f"; pods still deleting at {max(forced).strftime('%Y-%m-%dT%H:%M:%SZ')} are force-deleted"
    return text


def _start_attempt(
    b: _Builder,
    spec: DreamBoothJobSpec,
    attempt: int,
    older_active: list[Mapping[str, Any]],
    counted: list[str] | None,
) -> Plan:
    now = b.obs.now
    stuck = [p for p in older_active if (t := _stuck_since(p)) is not None and now > t]
    waiting = [p for p in older_active if all(p is not s for s in stuck)]
    if waiting:
        # The previous attempt's pods are still writing their last checkpoint; the next one must resume from it.
        b.phase(JobPhase.PENDING, _waiting_message(waiting))
        b.requeue.append(2.0)
        return b.plan(counted)
    note = ""
    if stuck:
        # Past their grace period the pods write nothing more (a checkpoint counts once its manifest is written).
        b.actions.extend(
            Action(ActionKind.FORCE_DELETE_POD, name=str(p["metadata"]["name"]), uid=podstate.pod_uid(p)) for p in stuck
        )
        note = (
            f"force-deleted {len(stuck)} pod(s) of the previous attempt still deleting "
            f"{int(STUCK_POD_MARGIN_SECONDS)}s past their grace period (node lost?): {_pod_names(stuck)}"
        )
        b.condition(JobConditionType.RUNNING, False, STUCK_PODS_FORCE_DELETED, f"{note}; starting attempt {attempt}")
    b.actions.append(Action(ActionKind.CREATE_ATTEMPT, attempt=attempt))
    if spec.run_policy.suspend:
        b.phase(JobPhase.SUSPENDED, "suspended by spec.runPolicy.suspend")
        b.condition(JobConditionType.SUSPENDED, True, Reason.SUSPENDED_BY_USER, "spec.runPolicy.suspend is true")
    elif is_queued_by_kueue(b.obs.job):
        b.phase(JobPhase.QUEUED, "waiting for the queue to admit the job")
        b.condition(JobConditionType.QUEUED, True, Reason.WAITING_FOR_ADMISSION, "waiting for admission")
    else:
        b.phase(JobPhase.PENDING, f"creating attempt {attempt}" + (f" ({note})" if note else ""))
    return b.plan(counted)


def _running(
    b: _Builder,
    spec: DreamBoothJobSpec,
    current: Mapping[str, Any],
    pods: list[Mapping[str, Any]],
    counted: list[str] | None,
) -> Plan:
    name = current["metadata"]["name"]
    kueue = is_queued_by_kueue(b.obs.job)
    user_suspend = spec.run_policy.suspend
    batch_suspended = podstate.job_suspended(current)
    wanted = suspend.desired_batch_suspend(user_suspend, batch_suspended, kueue)
    if wanted is not None:
        b.actions.append(Action(ActionKind.SET_SUSPEND, name=name, suspend=wanted))
    if user_suspend:
        b.phase(JobPhase.SUSPENDED, "suspended by spec.runPolicy.suspend; pods stop after a checkpoint")
        b.condition(JobConditionType.SUSPENDED, True, Reason.SUSPENDED_BY_USER, "spec.runPolicy.suspend is true")
        b.condition(JobConditionType.RUNNING, False, Reason.SUSPENDED_BY_USER, "suspended")
        return b.plan(counted)
    if find_condition(b.status.conditions, JobConditionType.SUSPENDED.value):
        b.condition(JobConditionType.SUSPENDED, False, Reason.RESUMED, "resumed from the last checkpoint")
    if suspend.waiting_for_admission(user_suspend, batch_suspended or wanted is True, kueue):
        b.phase(JobPhase.QUEUED, "waiting for the queue to admit the job")
        b.condition(JobConditionType.QUEUED, True, Reason.WAITING_FOR_ADMISSION, "waiting for admission")
        return b.plan(counted)
    if find_condition(b.status.conditions, JobConditionType.QUEUED.value) is not None:
        b.condition(JobConditionType.QUEUED, False, Reason.ADMITTED, "admitted")

    active = [p for p in pods if podstate.is_active(p) and not podstate.is_deleting(p)]
    pull = next((m for p in active if (m := podstate.image_pull_failure(p))), None)
    unsched = next((m for p in active if (m := podstate.unschedulable(p))), None)
    nodes = spec.resources.nodes
    running, done = _running_and_done(current, pods)
    stuck = pull or unsched
    if stuck is not None and _pod_spec_changed(current, spec):
        return _replace_stuck_attempt(b, name, stuck, counted)
    if pull is not None:
        b.phase(JobPhase.PENDING, f"the trainer image cannot be pulled: {pull}")
        b.condition(JobConditionType.RUNNING, False, Reason.IMAGE_PULL_FAILED, pull)
    elif unsched is not None:
        b.phase(JobPhase.PENDING, f"pods cannot be scheduled: {unsched}")
        b.condition(JobConditionType.RUNNING, False, Reason.UNSCHEDULABLE, unsched)
    elif running + done < nodes and not _ranks_unseen(b.prev.phase, current, pods, nodes):
        b.phase(JobPhase.PENDING, f"{running}/{nodes} pods running")
        if find_condition(b.status.conditions, JobConditionType.RUNNING.value) is None:
            b.condition(JobConditionType.RUNNING, False, Reason.PODS_PENDING, f"{running}/{nodes} pods running")
    else:
        restarted = b.status.attempt > 0 or b.status.restarts.total > 0 or b.status.restarts.preemptions > 0
        restarted = restarted or b.status.restarts.failures > 0
        progress = b.status.progress
        training = progress is not None and (
            (progress.stage or "") in TRAINING_STAGES or (progress.step > 0 and progress.stage != "Initializing")
        )
        phase = JobPhase.RUNNING if training else JobPhase.INITIALIZING
        b.phase(phase, "training" if training else "loading the model and data")
        reason = Reason.RESUMED if restarted else (Reason.TRAINING if training else Reason.PODS_RUNNING)
        b.condition(JobConditionType.RUNNING, True, reason, f"{nodes} pod(s) running (attempt {b.status.attempt})")
    _force_delete_lost(b, pods)
    return b.plan(counted)


def _force_delete_lost(b: _Builder, pods: list[Mapping[str, Any]]) -> None:
    """Pods of the running attempt still deleting past their grace period and the margin are on a lost node: the
    Job controller (podReplacementPolicy Failed) would wait for them forever, so they are force-deleted."""
    now = b.obs.now
    deleting = [(p, t) for p in pods if podstate.is_active(p) and (t := _stuck_since(p)) is not None]
    lost = [p for p, t in deleting if now > t]
    b.requeue.extend(max(0.5, (t - now).total_seconds()) for _, t in deleting if now <= t)
    if not lost:
        return
    b.actions.extend(
        Action(ActionKind.FORCE_DELETE_POD, name=str(p["metadata"]["name"]), uid=podstate.pod_uid(p)) for p in lost
    )
    note = (
        f"force-deleted {len(lost)} pod(s) still deleting {int(STUCK_POD_MARGIN_SECONDS)}s past their grace period "
        f"(node lost?): {_pod_names(lost)}; they are replaced and resume from the last checkpoint"
    )
    b.condition(JobConditionType.RUNNING, False, STUCK_PODS_FORCE_DELETED, note)


def _all_up(pods: list[Mapping[str, Any]]) -> bool:
    """No observed pod is a new cause to leave Running: each one runs or exited 0."""
    return all(podstate.is_running(p) or podstate.pod_phase(p) == "Succeeded" for p in pods)


def _running_and_done(current: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> tuple[int, int]:
    """Ranks running and ranks that exited 0. While no pod says otherwise, the Job controller's counters
    (`ready`, `succeeded`) count too: a finished pod may be gone (podgc) or not seen yet. Finished ranks count
    as running until the Job is Complete, so the phase does not drop back to Pending in between."""
    running = sum(1 for p in pods if podstate.is_running(p))
    done = sum(1 for p in pods if podstate.pod_phase(p) == "Succeeded")
    if not _all_up(pods):
        return running, done
    return max(running, podstate.job_count(current, "ready")), max(done, podstate.job_count(current, "succeeded"))


def _ranks_unseen(
    prev_phase: JobPhase | None, current: Mapping[str, Any], pods: list[Mapping[str, Any]], nodes: int
) -> bool:
    """A running job whose missing ranks are only not seen (yet): no pod says otherwise, and the Job controller
    counts every rank as active or succeeded. No new cause, so the phase stays."""
    if prev_phase not in (JobPhase.RUNNING, JobPhase.INITIALIZING) or not _all_up(pods):
        return False
    return podstate.job_count(current, "active") + podstate.job_count(current, "succeeded") >= nodes


def now_utc() -> datetime:
    return datetime.now(UTC)

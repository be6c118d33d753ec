"""The outcome of one reconcile (a Plan: the new status, the actions, the events) and the builder the policies
write it through.

Status never goes backwards: a condition from a newer generation is never overwritten by a stale one, and a
condition keeps its transition time while its status stays the same (`set_condition`). Events come from the
condition changes, once, when the plan is made; the handler emits them only after the status write succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from dreambooth_api.common import Condition, find_condition, set_condition
from dreambooth_api.constants import ConditionStatus, JobConditionType, JobPhase, Reason
from dreambooth_api.job import DreamBoothJobStatus
from dreambooth_operator import podstate
from dreambooth_operator.observed import Attempt, Observed
from dreambooth_operator.redact import redact

STUCK_PODS_FORCE_DELETED: Final = "StuckPodsForceDeleted"
"""Condition and event reason: pods stuck deleting on a lost node were force-deleted (policies/lost_pods.py)."""


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
    CREATE_PREFLIGHT = "CreatePreflight"
    """Ensure the ConfigMap and Service, then create the input check's batch Job `name` (policies/preflight.py)."""
    CREATE_EVALUATION = "CreateEvaluation"
    """Ensure the ConfigMap and Service, then create the re-evaluation's batch Job `name` for the job's evaluation
    request (policies/evaluate_rerun.py)."""


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
    """The new value of ANNOTATION_COUNTED_PREEMPTIONS, when it changed."""
    requeue_after: float | None = None
    """Reconcile again after this many seconds at the latest (deadline, TTL)."""
    finished: bool = False
    """Nothing is left to do for this job (terminal, and its TTL done or absent)."""

    def status_wire(self) -> dict[str, Any]:
        return self.status.to_wire()


class PlanBuilder:
    """Accumulates the new status, the actions and the events of one reconcile; each policy writes through it."""

    def __init__(self, obs: Observed, prev: DreamBoothJobStatus, generation: int | None) -> None:
        self.obs = obs
        self.prev = prev
        self.generation = generation
        self.status = prev.model_copy(deep=True)
        self.status.observed_generation = generation
        self.actions: list[Action] = []
        self.events: list[Event] = []
        self.requeue: list[float] = []
        self.counted_pods: list[str] | None = None
        """The new value of the counted-preemptions annotation (policies/preemption.py), when it changed."""

    @property
    def job_name(self) -> str:
        return str((self.obs.job.get("metadata") or {}).get("name"))

    def condition(self, type_: JobConditionType, status: bool, reason: str, message: str = "") -> None:
        new = Condition(
            type=type_.value,
            status=ConditionStatus.TRUE if status else ConditionStatus.FALSE,
            reason=reason,
            # Messages may quote a pod's termination message (its log tail): no credentials in status or events.
            message=redact(message)[:32768],
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
        self.status.message = redact(message)[:4096] if message else None

    def fail(self, reason: str, message: str) -> None:
        self.phase(JobPhase.FAILED, message)
        self.condition(JobConditionType.FAILED, True, reason, message)
        self.condition(JobConditionType.RUNNING, False, reason, message)
        if self.status.completion_time is None:
            self.status.completion_time = self.obs.now

    def stop_attempt(self, attempt: Attempt) -> None:
        """Delete the attempt's batch Job (its pods stop after their last checkpoint), unless that is under way."""
        if attempt.batch_job is not None and not podstate.is_deleting(attempt.batch_job):
            self.actions.append(Action(ActionKind.DELETE_BATCH_JOB, name=attempt.name))

    def plan(self, finished: bool = False) -> Plan:
        self.status.restarts.total = self.status.restarts.preemptions + self.status.restarts.failures
        self.status.reason = phase_reason(self.status)
        self.events.extend(transition_events(self.prev, self.status, self.job_name))
        return Plan(
            status=self.status,
            actions=self.actions,
            events=self.events,
            counted_pods=self.counted_pods,
            requeue_after=max(0.0, min(self.requeue)) if self.requeue else None,
            finished=finished,
        )


# The condition whose reason explains each phase (the Reason column); Pending looks at several, in this order.
PHASE_CONDITIONS: Final[dict[JobPhase, tuple[JobConditionType, ...]]] = {
    JobPhase.FAILED: (JobConditionType.FAILED,),
    JobPhase.SUCCEEDED: (JobConditionType.SUCCEEDED,),
    JobPhase.SUSPENDED: (JobConditionType.SUSPENDED,),
    JobPhase.QUEUED: (JobConditionType.QUEUED,),
    JobPhase.INITIALIZING: (JobConditionType.RUNNING,),
    JobPhase.RUNNING: (JobConditionType.RUNNING,),
    JobPhase.PENDING: (
        JobConditionType.CHILD_CONFLICT,
        JobConditionType.VALID,
        JobConditionType.RUNNING,
        JobConditionType.INPUT_CHECKED,
    ),
}


def phase_reason(status: DreamBoothJobStatus) -> str | None:
    """The reason of the first condition that explains the phase: a True condition of the phase's type, or, for
    Pending, a conflict, an invalid spec, or why the pods do not run yet."""
    if status.phase is None:
        return None
    for type_ in PHASE_CONDITIONS.get(status.phase, ()):
        cond = find_condition(status.conditions, type_.value)
        if cond is None:
            continue
        explains = cond.status == ConditionStatus.TRUE
        pending_types = (JobConditionType.VALID, JobConditionType.RUNNING, JobConditionType.INPUT_CHECKED)
        if type_ in pending_types and status.phase is JobPhase.PENDING:
            explains = cond.status == ConditionStatus.FALSE
        if type_ is JobConditionType.RUNNING and status.phase is not JobPhase.PENDING:
            explains = True
        if explains and cond.reason:
            return cond.reason
    return None


WARNING_REASONS: Final = frozenset(
    {
        Reason.INVALID_SPEC,
        Reason.INVALID_INPUT,
        Reason.LOSS_DIVERGED,
        Reason.PREEMPTED,
        Reason.RETRYING,
        Reason.BACKOFF_LIMIT_EXCEEDED,
        Reason.DEADLINE_EXCEEDED,
        Reason.GPU_SECONDS_LIMIT_EXCEEDED,
        Reason.UNSCHEDULABLE,
        Reason.IMAGE_PULL_FAILED,
        Reason.CHILD_CONFLICT,
        Reason.POLICY_VIOLATION,
        STUCK_PODS_FORCE_DELETED,
        Reason.REEVALUATION_FAILED,
        Reason.REEVALUATION_NOT_POSSIBLE,
    }
)


# The order of one reconcile's events, by the type of the condition that carries them: what happened to the pods
# first, then a checkpoint, then how the job ended. Conditions that change together with the same reason (Failed
# and Running on a failure, Succeeded and Running on success) are one transition: the last type in this order tells
# it (its condition's message is the event's).
EVENT_ORDER: Final = (
    JobConditionType.VALID,
    JobConditionType.CHILD_CONFLICT,
    JobConditionType.INPUT_CHECKED,
    JobConditionType.QUEUED,
    JobConditionType.SUSPENDED,
    JobConditionType.RUNNING,
    JobConditionType.CHECKPOINTED,
    JobConditionType.SUCCEEDED,
    JobConditionType.FAILED,
    JobConditionType.REEVALUATED,
)

NOT_NEWS: Final = frozenset({(Reason.PODS_PENDING, ConditionStatus.FALSE), (Reason.SPEC_VALID, ConditionStatus.TRUE)})
"""(reason, status) of a condition's first value that is no event: what every new job starts with."""

# What to do (or what happens next), after what happened: `{name}` is the job's name.
EVENT_HINTS: Final[dict[str, str]] = {
    Reason.INVALID_SPEC: "fix the spec and create the job again (a failed job is not retried)",
    Reason.INVALID_INPUT: "fix the input and create the job again (a failed job is not retried)",
    Reason.LOSS_DIVERGED: (
        "lower training.learningRate or set training.maxGradNorm, then create the job again (the run is seeded: a "
        "retry would diverge the same way)"
    ),
    Reason.CHECKING_INPUT: "the GPU Job starts once the input passes (`kubectl logs job/{name}-check`)",
    Reason.INPUT_VALID: "creating the GPU Job",
    Reason.INPUT_CHECK_INCONCLUSIVE: "`kubectl logs job/{name}-check` shows why the check did not finish",
    Reason.POLICY_VIOLATION: "use what the operator's restrictions allow and create the job again",
    Reason.PODS_RUNNING: "the trainer loads the model and the images (`dreambooth logs {name}`)",
    Reason.TRAINING: "training started (`dreambooth watch {name}` shows the progress)",
    Reason.UNSCHEDULABLE: (
        "no node fits the pods: check spec.resources and spec.podTemplate (nodeSelector, tolerations), "
        "a fixed podTemplate applies at once"
    ),
    Reason.IMAGE_PULL_FAILED: "fix spec.podTemplate.image (or its pull secret), the fix applies at once",
    Reason.RETRYING: "`dreambooth logs {name}` shows the trainer's error",
    Reason.BACKOFF_LIMIT_EXCEEDED: "`dreambooth logs {name}` shows the trainer's error: fix it, create the job again",
    Reason.DEADLINE_EXCEEDED: "raise spec.runPolicy.activeDeadlineSeconds and create the job again",
    Reason.GPU_SECONDS_LIMIT_EXCEEDED: "raise spec.runPolicy.gpuSecondsLimit and create the job again",
    Reason.SUSPENDED_BY_USER: "set spec.runPolicy.suspend to false to resume from the last checkpoint",
    Reason.CHILD_CONFLICT: "delete or rename that object (the job waits)",
    Reason.CHECKPOINT_WRITTEN: "a restarted pod resumes from the newest checkpoint",
    Reason.TRAINING_COMPLETED: (
        "`dreambooth report {name}` shows the samples, and an InferenceService with model.fromJob: {name} serves it"
    ),
    Reason.REEVALUATING: "`kubectl logs job/{name}-eval` shows its progress",
    Reason.REEVALUATED: "status.outputs holds the new scores (`dreambooth status {name}`)",
    Reason.REEVALUATION_FAILED: "`kubectl logs job/{name}-eval` shows why; set a new dreambooth.dev/evaluate to retry",
}


def event_text(reason: str, message: str, name: str) -> str:
    """What happened (the condition's message) and what to do (EVENT_HINTS)."""
    hint = EVENT_HINTS.get(reason, "").format(name=name)
    return f"{message.rstrip('. ')}; {hint}" if message and hint else message or hint or reason


def transition_events(prev: DreamBoothJobStatus, new: DreamBoothJobStatus, name: str = "") -> list[Event]:
    """One event per transition: per reason among the conditions whose status or reason changed in this reconcile
    (conditions that change with one reason are one event), in EVENT_ORDER."""
    changed: dict[str, list[Condition]] = {}
    for cond in new.conditions:
        old = find_condition(prev.conditions, cond.type)
        if old is not None and old.status == cond.status and old.reason == cond.reason:
            continue
        if old is None and (cond.reason, cond.status) in NOT_NEWS:
            continue  # a new job whose spec is valid, or whose pods start out pending, is not news
        changed.setdefault(cond.reason or cond.type, []).append(cond)
    order = {t.value: i for i, t in enumerate(EVENT_ORDER)}
    events: list[tuple[int, Event]] = []
    for reason, group in changed.items():
        main = max(group, key=lambda c: order.get(c.type, -1))
        warning = reason in WARNING_REASONS and any(
            c.status == ConditionStatus.TRUE
            or c.type in (JobConditionType.RUNNING, JobConditionType.INPUT_CHECKED, JobConditionType.REEVALUATED)
            for c in group
        )
        text = event_text(reason, main.message or f"{main.type} is {main.status.value}", name)
        events.append((order.get(main.type, -1), Event("Warning" if warning else "Normal", reason, text)))
    return [event for _, event in sorted(events, key=lambda pair: pair[0])]

"""Suspend policy: spec.runPolicy.suspend <-> the batch Job's spec.suspend, and a queue's (Kueue's) admission.

Suspending sets the batch Job's suspend: the Job controller deletes the pods, which get SIGTERM and write a
checkpoint. Resuming unsuspends it, and the new pods resume from that checkpoint. A job queued by Kueue is
created suspended and is unsuspended by Kueue (admission), never by the operator.
"""

from __future__ import annotations

from dreambooth_api.common import find_condition
from dreambooth_api.constants import JobConditionType, JobPhase, Reason
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator import podstate
from dreambooth_operator.builders import is_queued_by_kueue
from dreambooth_operator.observed import Attempt
from dreambooth_operator.plan import Action, ActionKind, Plan, PlanBuilder


def desired_batch_suspend(user_suspend: bool, batch_suspended: bool, queued_by_kueue: bool) -> bool | None:
    """The value to write to the batch Job's spec.suspend, or None to leave it as it is."""
    if user_suspend and not batch_suspended:
        return True
    if not user_suspend and batch_suspended and not queued_by_kueue:
        return False
    return None


def waiting_for_admission(user_suspend: bool, batch_suspended: bool, queued_by_kueue: bool) -> bool:
    """Suspended by a queue rather than by the user: the job is Queued."""
    return batch_suspended and queued_by_kueue and not user_suspend


def _suspended(b: PlanBuilder, message: str) -> None:
    b.phase(JobPhase.SUSPENDED, message)
    b.condition(JobConditionType.SUSPENDED, True, Reason.SUSPENDED_BY_USER, "spec.runPolicy.suspend is true")


def _queued(b: PlanBuilder) -> None:
    b.phase(JobPhase.QUEUED, "waiting for the queue to admit the job")
    b.condition(JobConditionType.QUEUED, True, Reason.WAITING_FOR_ADMISSION, "waiting for admission")


def _evicted(b: PlanBuilder, *, count: bool) -> None:
    """An admitted attempt that the queue suspended again (Kueue preempted it): its pods stop after a checkpoint,
    and it waits to be admitted again. Counted as one preemption when it happens (`count`)."""
    if count:
        b.status.restarts.preemptions += 1
    b.phase(JobPhase.QUEUED, "preempted by the queue; resumes from its last checkpoint when admitted again")
    b.condition(JobConditionType.QUEUED, True, Reason.PREEMPTED, "preempted by the queue; waiting for admission")
    b.condition(JobConditionType.RUNNING, False, Reason.PREEMPTED, "the queue took the GPUs back")


def hold_new_attempt(b: PlanBuilder, spec: DreamBoothJobSpec) -> bool:
    """An attempt being created: True when it is created suspended (by the user, or for the queue to admit it)."""
    if spec.run_policy.suspend:
        _suspended(b, "suspended by spec.runPolicy.suspend")
        return True
    if is_queued_by_kueue(b.obs.job):
        _queued(b)
        return True
    return False


def hold(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt) -> Plan | None:
    """The existing attempt: keep its batch Job's suspend in line with the user's and the queue's; the plan while
    the job is suspended or waits for admission, else None (and the Suspended/Queued conditions turn False)."""
    if attempt.batch_job is None:
        return None
    kueue = is_queued_by_kueue(b.obs.job)
    user_suspend = spec.run_policy.suspend
    batch_suspended = podstate.job_suspended(attempt.batch_job)
    wanted = desired_batch_suspend(user_suspend, batch_suspended, kueue)
    if wanted is not None:
        b.actions.append(Action(ActionKind.SET_SUSPEND, name=attempt.name, suspend=wanted))
    if user_suspend:
        _suspended(b, "suspended by spec.runPolicy.suspend; pods stop after a checkpoint")
        b.condition(JobConditionType.RUNNING, False, Reason.SUSPENDED_BY_USER, "suspended")
        return b.plan()
    if find_condition(b.status.conditions, JobConditionType.SUSPENDED.value):
        b.condition(JobConditionType.SUSPENDED, False, Reason.RESUMED, "resumed from the last checkpoint")
    if waiting_for_admission(user_suspend, batch_suspended or wanted is True, kueue):
        queued = find_condition(b.status.conditions, JobConditionType.QUEUED.value)
        # (A user's resume of an admitted job also finds it suspended and queued again: not a preemption.)
        was_suspended = find_condition(b.prev.conditions, JobConditionType.SUSPENDED.value)
        resumed_now = was_suspended is not None and was_suspended.status == "True"
        if queued is not None and not resumed_now and (queued.status == "False" or queued.reason == Reason.PREEMPTED):
            _evicted(b, count=queued.status == "False")
        else:
            _queued(b)
        return b.plan()
    if find_condition(b.status.conditions, JobConditionType.QUEUED.value) is not None:
        b.condition(JobConditionType.QUEUED, False, Reason.ADMITTED, "admitted")
    return None

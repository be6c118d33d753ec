"""TTL policy: spec.runPolicy.ttlSecondsAfterFinished deletes the children, and keeps the DreamBoothJob.

A terminal job changes nothing else: this policy is how every terminal reconcile ends (`finish`).
"""

from __future__ import annotations

from datetime import datetime

from dreambooth_api.common import find_condition
from dreambooth_api.constants import JobConditionType, Reason
from dreambooth_operator.plan import Action, ActionKind, Plan, PlanBuilder


def remaining_seconds(completion: datetime | None, ttl_seconds: int | None, now: datetime) -> float | None:
    """Seconds until the children are deleted (negative once due), or None without a TTL or completion."""
    if ttl_seconds is None or completion is None:
        return None
    return ttl_seconds - (now - completion).total_seconds()


def expired(completion: datetime | None, ttl_seconds: int | None, now: datetime) -> bool:
    left = remaining_seconds(completion, ttl_seconds, now)
    return left is not None and left <= 0


def finish(b: PlanBuilder) -> Plan:
    """Terminal: apply the TTL policy, nothing else changes.

    The TTL deletes the batch Jobs (and so the pods), the Service and the ConfigMap once, and records that in
    the Running condition (reason ChildDeleted), so that the loop knows it is done after a restart too.
    """
    spec_raw = b.obs.job.get("spec") or {}
    ttl_seconds = (spec_raw.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    left = remaining_seconds(b.status.completion_time, ttl_seconds, b.obs.now)
    running = find_condition(b.status.conditions, JobConditionType.RUNNING.value)
    cleaned = running is not None and running.reason == Reason.CHILD_DELETED
    if left is None or (cleaned and not b.obs.batch_jobs):
        return b.plan(finished=True)
    if left > 0:
        b.requeue.append(left)
        return b.plan()
    b.actions.append(Action(ActionKind.DELETE_CHILDREN, name=b.job_name))
    b.condition(
        JobConditionType.RUNNING,
        False,
        Reason.CHILD_DELETED,
        f"ttlSecondsAfterFinished ({ttl_seconds}s) passed: deleted the batch Job, pods, Service and ConfigMap",
    )
    b.requeue.append(2.0)
    return b.plan()

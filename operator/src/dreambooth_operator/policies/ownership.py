"""Ownership policy: an attempt is created only when nothing else holds the names of the children every attempt
shares (ConfigMap, Service, NetworkPolicy) or of its batch Job. A name held by an object the job does not control
is a conflict (condition ChildConflict, a Warning event naming the object, phase Pending): never overwritten or
deleted. Children of an earlier object with the job's name, still being garbage-collected, are waited for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from dreambooth_api.common import find_condition
from dreambooth_api.constants import ConditionStatus, JobConditionType, JobPhase, Reason
from dreambooth_operator import ownership
from dreambooth_operator.plan import Plan, PlanBuilder

CONFLICT_RECHECK_SECONDS: Final = 10.0
"""How often a job blocked by a foreign object looks again (it is not watched)."""
LEFTOVER_RECHECK_SECONDS: Final = 2.0


def _block(b: PlanBuilder, found: list[ownership.Foreign]) -> None:
    message = ownership.conflicts_message(found)
    b.phase(JobPhase.PENDING, message)
    if all(f.leftover or f.deleting for f in found):
        b.requeue.append(LEFTOVER_RECHECK_SECONDS)
        return
    b.condition(JobConditionType.CHILD_CONFLICT, True, Reason.CHILD_CONFLICT, message)
    b.requeue.append(CONFLICT_RECHECK_SECONDS)


def _resolved(b: PlanBuilder) -> None:
    cond = find_condition(b.status.conditions, JobConditionType.CHILD_CONFLICT.value)
    if cond is not None and cond.status == ConditionStatus.TRUE:
        b.condition(JobConditionType.CHILD_CONFLICT, False, Reason.CONFLICT_RESOLVED, "the job's children are its own")


def blocked_by_batch_job(b: PlanBuilder, blocker: Mapping[str, Any]) -> Plan:
    """A batch Job with this attempt's name that the job does not control (never adopted): wait until it is gone."""
    found = ownership.foreign("Job", blocker, b.obs.job)
    if found is None:  # not reachable: `blocker` is foreign by construction (observed.split_owned)
        return b.plan()
    _block(b, [found])
    return b.plan()


def blocked(b: PlanBuilder) -> bool:
    """True when an attempt cannot be created because another object holds a shared child's name. Decided only
    when the children were read (`Observed.children`); the first plan of a reconcile does not know yet."""
    if b.obs.children is None:
        return False
    found = ownership.foreign_children(b.obs.children, b.obs.job)
    if found:
        _block(b, found)
        return True
    _resolved(b)
    return False

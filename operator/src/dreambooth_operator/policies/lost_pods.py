"""Lost-node policy: a pod still deleting STUCK_POD_MARGIN_SECONDS past its deletionTimestamp (the deletion request
plus the grace period, when the kubelet should have stopped it) is on a lost node: no kubelet will confirm the stop,
so it is force-deleted. Past their grace period such pods write nothing more (a checkpoint counts once its manifest
is written), so the next attempt, or the replacement pod, resumes from the last complete checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from dreambooth_api.constants import JobConditionType, JobPhase
from dreambooth_operator import podstate
from dreambooth_operator.observed import Attempt
from dreambooth_operator.plan import STUCK_PODS_FORCE_DELETED, Action, ActionKind, PlanBuilder

STUCK_POD_MARGIN_SECONDS: Final = 30.0
"""How long past its deletionTimestamp a pod may hold up the next attempt (or its replacement)."""


def stuck_since(pod: Mapping[str, Any]) -> datetime | None:
    """When a deleting pod counts as stuck (its node is lost): its deletionTimestamp plus the margin."""
    at = podstate.deletion_time(pod)
    return at + timedelta(seconds=STUCK_POD_MARGIN_SECONDS) if at is not None else None


def pod_names(pods: list[Mapping[str, Any]], limit: int = 3) -> str:
    names_ = [str(p.get("metadata", {}).get("name")) for p in pods]
    more = f" and {len(names_) - limit} more" if len(names_) > limit else ""
    return ", ".join(names_[:limit]) + more


def _waiting_message(pods: list[Mapping[str, Any]]) -> str:
    forced = [t for p in pods if (t := stuck_since(p)) is not None]
    text = f"waiting for {len(pods)} pod(s) of the previous attempt to stop (last checkpoint): {pod_names(pods)}"
    if forced:
        text += f"; pods still deleting at {max(forced).strftime('%Y-%m-%dT%H:%M:%SZ')} are force-deleted"
    return text


def _force_delete(b: PlanBuilder, pods: list[Mapping[str, Any]]) -> None:
    b.actions.extend(
        Action(ActionKind.FORCE_DELETE_POD, name=str(p["metadata"]["name"]), uid=podstate.pod_uid(p)) for p in pods
    )


def clear_previous_attempt(b: PlanBuilder, attempt: Attempt) -> str | None:
    """Before the next attempt starts: None while pods of earlier attempts are still stopping (they write their
    last checkpoint, which the next attempt must resume from; the job stays Pending). Else a note for the start
    message: empty, or which stuck pods were force-deleted."""
    now = b.obs.now
    older = attempt.older_active
    stuck = [p for p in older if (t := stuck_since(p)) is not None and now > t]
    waiting = [p for p in older if all(p is not s for s in stuck)]
    if waiting:
        b.phase(JobPhase.PENDING, _waiting_message(waiting))
        b.requeue.append(2.0)
        return None
    if not stuck:
        return ""
    _force_delete(b, stuck)
    note = (
        f"force-deleted {len(stuck)} pod(s) of the previous attempt still deleting "
        f"{int(STUCK_POD_MARGIN_SECONDS)}s past their grace period (node lost?): {pod_names(stuck)}"
    )
    b.condition(JobConditionType.RUNNING, False, STUCK_PODS_FORCE_DELETED, f"{note}; starting attempt {attempt.number}")
    return note


def force_delete_lost(b: PlanBuilder, pods: list[Mapping[str, Any]]) -> None:
    """Pods of the running attempt still deleting past their grace period and the margin are on a lost node: the
    Job controller (podReplacementPolicy Failed) would wait for them forever, so they are force-deleted. Until
    then, reconcile again when the first one would count as lost."""
    now = b.obs.now
    deleting = [(p, t) for p in pods if podstate.is_active(p) and (t := stuck_since(p)) is not None]
    lost = [p for p, t in deleting if now > t]
    b.requeue.extend(max(0.5, (t - now).total_seconds()) for _, t in deleting if now <= t)
    if not lost:
        return
    _force_delete(b, lost)
    note = (
        f"force-deleted {len(lost)} pod(s) still deleting {int(STUCK_POD_MARGIN_SECONDS)}s past their grace period "
        f"(node lost?): {pod_names(lost)}; they are replaced and resume from the last checkpoint"
    )
    b.condition(JobConditionType.RUNNING, False, STUCK_PODS_FORCE_DELETED, note)

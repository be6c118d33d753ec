"""GPU-time accounting of a DreamBoothJob (pure): how long each of its pods held a node, summed over attempts.

A pod holds its node's GPUs from the moment the scheduler binds it (PodScheduled) until it stops (its containers'
last finishedAt, once the pod is Succeeded or Failed). Each pod is counted once, by uid, in a ledger kept in the
status, so an operator restart or a re-listed pod never counts twice. A pod deleted before a reconcile saw it stop
(with its batch Job on a gang restart, or by an eviction) is closed from the last state its watch DELETED event
carried; only when that event was missed (an operator restart in between) is it counted until it was last seen
running, an undercount of at most one reconcile interval plus REFRESH_SECONDS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from dreambooth_api.job import PodRun, Usage
from dreambooth_operator import podstate

REFRESH_SECONDS: Final = 15.0
"""A running pod's end (last seen) advances in steps of at least this: the operator's own status write wakes its
loop, so a value that changed at every reconcile would keep it busy. The live figure lags by up to this much."""
KEEP_GONE: Final = 16
"""Ledger entries kept for pods no longer observed; older ones are folded into earlierPodSeconds."""


def bound_at(pod: Mapping[str, Any]) -> datetime | None:
    """When the pod was bound to its node: its PodScheduled condition's transition to True, else its startTime;
    None while it is unscheduled."""
    scheduled = podstate.condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "True":
        at = podstate.parse_time(scheduled.get("lastTransitionTime"))
        if at is not None:
            return at
    return podstate.parse_time((pod.get("status") or {}).get("startTime"))


def stopped_at(pod: Mapping[str, Any]) -> datetime | None:
    """When a pod in a terminal phase stopped: its containers' last finishedAt, else the last transition of its
    conditions (a pod that failed before any container ran); None while it runs."""
    if not podstate.is_terminal(pod):
        return None
    status = pod.get("status") or {}
    statuses = list(status.get("containerStatuses") or []) + list(status.get("initContainerStatuses") or [])
    finished = [
        t
        for cs in statuses
        if (t := podstate.parse_time(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt")))
    ]
    if finished:
        return max(finished)
    changed = [t for c in status.get("conditions") or [] if (t := podstate.parse_time(c.get("lastTransitionTime")))]
    return max(changed) if changed else None


def _seconds(run: PodRun) -> float:
    return max(0.0, (run.end - run.start).total_seconds())


def account(
    prev: Usage | None,
    pods: list[Mapping[str, Any]],
    gpus_per_pod: int,
    now: datetime,
    gone: Sequence[Mapping[str, Any]] = (),
    refresh: bool = False,
) -> Usage:
    """The ledger after observing `pods` (all pods of the job, of every attempt) at `now`; `gone` are the last states
    of pods deleted since (from their watch DELETED events), which close the ledger entries of pods seen before.
    With `refresh`, running pods are counted up to `now` (no REFRESH_SECONDS step): for a final figure."""
    runs = {r.uid: r for r in prev.pods} if prev is not None else {}
    earlier = prev.earlier_pod_seconds if prev is not None else 0
    seen: set[str] = set()
    for pod in pods:
        uid, start = podstate.pod_uid(pod), bound_at(pod)
        if not uid or start is None:
            continue
        seen.add(uid)
        old = runs.get(uid)
        if old is not None and old.final:
            continue
        stop = stopped_at(pod)
        if stop is None and podstate.is_terminal(pod):
            stop = old.end if old is not None else now  # stopped, with no time recorded: as last seen
        if stop is not None:
            end = stop
        elif not refresh and old is not None and (now - old.end).total_seconds() < REFRESH_SECONDS:
            end = old.end  # unchanged: a status write (which wakes the reconcile loop) only every REFRESH_SECONDS
        else:
            end = now
        runs[uid] = PodRun(uid=uid, start=start, end=max(end, start), final=stop is not None)
    for pod in gone:
        old = runs.get(podstate.pod_uid(pod))
        if old is None or old.final or old.uid in seen:
            continue  # only pods counted while they lived; a pod listed again is still there
        stop = stopped_at(pod)
        if stop is None:  # deleted before it stopped (forced): at the latest its deletion time
            stop = max(old.end, min(now, podstate.deletion_time(pod) or now))
        runs[old.uid] = old.model_copy(update={"end": max(stop, old.start), "final": True})
    unseen = sorted((r for r in runs.values() if r.uid not in seen), key=lambda r: r.end)
    for run in unseen[: max(0, len(unseen) - KEEP_GONE)]:
        earlier += round(_seconds(run))
        del runs[run.uid]
    pod_seconds = earlier + round(sum(_seconds(r) for r in runs.values()))
    return Usage(
        pod_seconds=pod_seconds,
        gpu_seconds=pod_seconds * gpus_per_pod,
        gpus_per_pod=gpus_per_pod,
        pods=sorted(runs.values(), key=lambda r: (r.start, r.uid)),
        earlier_pod_seconds=earlier,
    )


def _running(usage: Usage, pods: list[Mapping[str, Any]]) -> list[PodRun]:
    """The ledger entries of pods listed and still running."""
    live = {podstate.pod_uid(p) for p in pods if not podstate.is_terminal(p)}
    return [r for r in usage.pods if not r.final and r.uid in live]


def live_gpu_seconds(usage: Usage, pods: list[Mapping[str, Any]], now: datetime) -> float:
    """gpuSeconds as of `now`: the recorded figure plus each running pod's time since its entry's end."""
    extra = sum(max(0.0, (now - r.end).total_seconds()) for r in _running(usage, pods))
    return usage.gpu_seconds + extra * usage.gpus_per_pod


def gpus_held(usage: Usage, pods: list[Mapping[str, Any]]) -> int:
    """GPUs the job's running pods hold now: the rate at which gpuSeconds grows."""
    return len(_running(usage, pods)) * usage.gpus_per_pod


def gpus_per_pod(job: Mapping[str, Any]) -> int:
    """spec.resources.gpusPerNode (immutable), defaulting as the CRD does; 0 when malformed."""
    value = ((job.get("spec") or {}).get("resources") or {}).get("gpusPerNode", 1)
    return value if isinstance(value, int) and value >= 0 else 0

"""What one reconcile of a DreamBoothJob sees (observe), and the split of its children by attempt (classify).

Pure: the handler gathers the observation from kopf's indexes and rank 0's /progress; the reconcile and the
policies read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from dreambooth_api.constants import LABEL_ATTEMPT
from dreambooth_api.job import DreamBoothJobStatus
from dreambooth_api.progress import ProgressDocument
from dreambooth_operator import names, podstate
from dreambooth_operator.ownership import ObservedChildren
from dreambooth_operator.restrictions import Rules


@dataclass(frozen=True)
class ProgressSample:
    """One /progress document read from rank 0 of `attempt`."""

    attempt: int
    pod_uid: str
    pod_start: datetime | None
    document: ProgressDocument
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
    children: ObservedChildren | None = None
    """The children every attempt shares (ConfigMap, Service, NetworkPolicy) as read, by (kind, name); None when
    not read (the handler reads them only when the plan creates an attempt, and then plans again)."""
    rules: Rules = field(default_factory=Rules)
    """The operator's restrictions in the job's namespace (restrictions.py)."""


@dataclass(frozen=True)
class Attempt:
    """The children of one DreamBoothJob, classified against its current attempt (status.attempt)."""

    number: int
    name: str
    """The current attempt's batch Job name."""
    batch_job: Mapping[str, Any] | None
    """The current attempt's batch Job, when it exists (and this object owns it)."""
    pods: list[Mapping[str, Any]]
    """The current attempt's pods."""
    older_active: list[Mapping[str, Any]]
    """Pods of earlier attempts that have not finished (they may still be writing their last checkpoint)."""
    older_batch_jobs: list[Mapping[str, Any]]
    """Batch Jobs of earlier attempts that are not being deleted yet."""
    blocker: Mapping[str, Any] | None
    """A batch Job with the current attempt's name that belongs to another object (an earlier job of this name)."""


def now_utc() -> datetime:
    return datetime.now(UTC)


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


def split_owned(obs: Observed) -> tuple[Observed, list[Mapping[str, Any]]]:
    """The observation cut down to this object's children (pods: those of an owned batch Job), and the
    foreign batch Jobs that carry the job's label."""
    if not (obs.job.get("metadata") or {}).get("uid"):
        return obs, []
    owned = owned_batch_jobs(obs.job, obs.batch_jobs)
    uids = {str(j["metadata"].get("uid")) for j in owned}
    foreign = [j for j in obs.batch_jobs if str(j["metadata"].get("uid")) not in uids]
    pods = [p for p in obs.pods if podstate.controller_uid(p) in uids]
    return replace(obs, batch_jobs=owned, pods=pods), foreign


def attempt_of(obj: Mapping[str, Any]) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_ATTEMPT)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def classify(obs: Observed, job_name: str, attempt: int, foreign: list[Mapping[str, Any]]) -> Attempt:
    """The owned children split by attempt; `foreign` are the batch Jobs of another object (`split_owned`)."""
    name = names.batch_job_name(job_name, attempt)
    older_batch_jobs = [
        j
        for j in obs.batch_jobs
        if (number := attempt_of(j)) is not None and number < attempt and not podstate.is_deleting(j)
    ]
    return Attempt(
        number=attempt,
        name=name,
        batch_job=next((j for j in obs.batch_jobs if j["metadata"]["name"] == name), None),
        pods=[p for p in obs.pods if attempt_of(p) == attempt],
        older_active=[p for p in obs.pods if (attempt_of(p) or 0) < attempt and podstate.is_active(p)],
        older_batch_jobs=older_batch_jobs,
        blocker=next((j for j in foreign if j["metadata"]["name"] == name), None),
    )

"""Deadline policy: spec.runPolicy.activeDeadlineSeconds, counted from status.startTime.

The clock stops while the job is suspended or its attempt waits for a queue's (Kueue's) admission: the start
time is set (or reset) when the job resumes or is admitted, as the Job controller does for a batch Job, so time
spent suspended or queued does not count. Past the deadline the attempt is stopped and the job fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from dreambooth_api.constants import JobPhase, Reason
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator import podstate
from dreambooth_operator.builders import is_queued_by_kueue
from dreambooth_operator.observed import Attempt
from dreambooth_operator.plan import PlanBuilder


def remaining_seconds(start: datetime | None, deadline_seconds: int | None, now: datetime) -> float | None:
    """Seconds left before the deadline (negative once past), or None without a deadline or start."""
    if deadline_seconds is None or start is None:
        return None
    return deadline_seconds - (now - start).total_seconds()


def exceeded(start: datetime | None, deadline_seconds: int | None, now: datetime) -> bool:
    left = remaining_seconds(start, deadline_seconds, now)
    return left is not None and left <= 0


def clock_stopped(spec: DreamBoothJobSpec, job: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """The deadline clock does not run: the user suspended the job, or its attempt is (to be) created suspended
    for a queue and is not admitted yet."""
    if spec.run_policy.suspend:
        return True
    return is_queued_by_kueue(job) and (current is None or podstate.job_suspended(current))


def passed(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt) -> bool:
    """True once the job failed for running past activeDeadlineSeconds (its attempt is stopped); before that,
    reconcile again when the deadline comes."""
    if clock_stopped(spec, b.obs.job, attempt.batch_job):
        return False
    if b.status.start_time is None or b.prev.phase in (JobPhase.QUEUED, JobPhase.SUSPENDED):
        b.status.start_time = b.obs.now
    seconds = spec.run_policy.active_deadline_seconds
    left = remaining_seconds(b.status.start_time, seconds, b.obs.now)
    if left is None:
        return False
    if left > 0:
        b.requeue.append(left)
        return False
    b.stop_attempt(attempt)
    b.fail(Reason.DEADLINE_EXCEEDED, f"the job ran longer than activeDeadlineSeconds ({seconds}s)")
    return True

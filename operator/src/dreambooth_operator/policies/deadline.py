"""Deadline policy: spec.runPolicy.activeDeadlineSeconds, counted from status.startTime.

The clock stops while the job is suspended or its attempt waits for a queue's (Kueue's) admission: the start
time is set (or reset) when the job resumes or is admitted, as the Job controller does for a batch Job, so time
spent suspended or queued does not count.
"""

from __future__ import annotations

from datetime import datetime


def remaining_seconds(start: datetime | None, deadline_seconds: int | None, now: datetime) -> float | None:
    """Seconds left before the deadline (negative once past), or None without a deadline or start."""
    if deadline_seconds is None or start is None:
        return None
    return deadline_seconds - (now - start).total_seconds()


def exceeded(start: datetime | None, deadline_seconds: int | None, now: datetime) -> bool:
    left = remaining_seconds(start, deadline_seconds, now)
    return left is not None and left <= 0

"""TTL policy: spec.runPolicy.ttlSecondsAfterFinished deletes the children, and keeps the DreamBoothJob."""

from __future__ import annotations

from datetime import datetime


def remaining_seconds(completion: datetime | None, ttl_seconds: int | None, now: datetime) -> float | None:
    """Seconds until the children are deleted (negative once due), or None without a TTL or completion."""
    if ttl_seconds is None or completion is None:
        return None
    return ttl_seconds - (now - completion).total_seconds()


def expired(completion: datetime | None, ttl_seconds: int | None, now: datetime) -> bool:
    left = remaining_seconds(completion, ttl_seconds, now)
    return left is not None and left <= 0

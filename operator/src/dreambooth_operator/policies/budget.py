"""GPU budget policy: spec.runPolicy.gpuSecondsLimit against the GPU time the job's pods used (status.usage)."""

from __future__ import annotations


def remaining_gpu_seconds(limit: int | None, used: float) -> float | None:
    """GPU-seconds left (0 or less once spent), or None without a limit."""
    return None if limit is None else limit - used


def seconds_until_spent(left: float, gpus_held: int) -> float | None:
    """Wall seconds until `left` GPU-seconds are spent by `gpus_held` GPUs; None while none is held."""
    return left / gpus_held if gpus_held > 0 else None

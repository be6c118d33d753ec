"""GPU budget policy: the GPU time the job's pods used (status.usage, usage.py) against
spec.runPolicy.gpuSecondsLimit. Past the limit the attempt is stopped and the job fails; before it, the job is
reconciled again when the GPUs held now would spend the rest."""

from __future__ import annotations

from dreambooth_api.constants import Reason
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator import usage
from dreambooth_operator.observed import Attempt
from dreambooth_operator.plan import PlanBuilder


def remaining_gpu_seconds(limit: int | None, used: float) -> float | None:
    """GPU-seconds left (0 or less once spent), or None without a limit."""
    return None if limit is None else limit - used


def seconds_until_spent(left: float, gpus_held: int) -> float | None:
    """Wall seconds until `left` GPU-seconds are spent by `gpus_held` GPUs; None while none is held."""
    return left / gpus_held if gpus_held > 0 else None


def account_usage(b: PlanBuilder) -> None:
    """Bring the status' GPU-time ledger up to date with the observed pods (every phase, terminal ones too)."""
    obs = b.obs
    if obs.pods or b.prev.usage is not None:
        b.status.usage = usage.account(b.prev.usage, obs.pods, usage.gpus_per_pod(obs.job), obs.now, obs.gone_pods)


def spent(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt) -> bool:
    """runPolicy.gpuSecondsLimit: True once the job failed for reaching it."""
    limit = spec.run_policy.gpu_seconds_limit
    if limit is None or b.status.usage is None:
        return False
    obs = b.obs
    left = remaining_gpu_seconds(limit, usage.live_gpu_seconds(b.status.usage, obs.pods, obs.now))
    if left is None:
        return False
    if left > 0:
        wait = seconds_until_spent(left, usage.gpus_held(b.status.usage, obs.pods))
        if wait is not None:
            b.requeue.append(wait)
        return False
    # The figure to show: counted up to now, not to the last REFRESH_SECONDS step.
    b.status.usage = usage.account(
        b.prev.usage, obs.pods, b.status.usage.gpus_per_pod, obs.now, obs.gone_pods, refresh=True
    )
    b.stop_attempt(attempt)
    checkpoint = b.status.last_checkpoint
    kept = f"; the last checkpoint (step {checkpoint.step}) stays at {checkpoint.uri}" if checkpoint else ""
    b.fail(
        Reason.GPU_SECONDS_LIMIT_EXCEEDED,
        f"the job's pods used {b.status.usage.gpu_seconds} GPU-seconds, reaching runPolicy.gpuSecondsLimit "
        f"({limit}){kept}",
    )
    return True

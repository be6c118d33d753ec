"""Pure formatting of DreamBoothJob objects for `list`, `status` and `watch`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from dreambooth_api.constants import JobPhase
from dreambooth_api.progress import TrainerPhase
from dreambooth_cli.events import Progress


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(created: Any, now: datetime) -> str:
    """kubectl-style age: 45s, 12m, 3h, 2d."""
    start = parse_time(created)
    if start is None:
        return "-"
    seconds = max(0, int((now - start).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def status_of(job: dict[str, Any]) -> dict[str, Any]:
    status = job.get("status")
    return status if isinstance(status, dict) else {}


def phase_of(job: dict[str, Any]) -> str:
    return str(status_of(job).get("phase") or "Pending")


def progress_of(job: dict[str, Any]) -> Progress:
    """status.progress; its `phase` is the job's, or Evaluating while a running job's trainer evaluates."""
    progress = Progress(phase=phase_of(job))
    raw = status_of(job).get("progress")
    if isinstance(raw, dict):
        progress.update(raw)
        evaluating = raw.get("stage") == TrainerPhase.EVALUATING and phase_of(job) == JobPhase.RUNNING
        progress.phase = TrainerPhase.EVALUATING.value if evaluating else phase_of(job)
    if progress.total_steps is None:
        total = job.get("spec", {}).get("training", {}).get("maxSteps")
        progress.total_steps = total if isinstance(total, int) else None
    return progress


def restarts_of(job: dict[str, Any]) -> int:
    """status.restarts.total (preemptions + failures), as the RESTARTS printer column shows it."""
    restarts = status_of(job).get("restarts")
    if not isinstance(restarts, dict):
        return 0
    total = restarts.get("total")
    if isinstance(total, int):
        return total
    return sum(v for k, v in restarts.items() if k in ("preemptions", "failures") and isinstance(v, int))


def fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _minutes(seconds: int) -> str:
    return f"{seconds / 60:.1f}"


def gpu_minutes(job: dict[str, Any]) -> str:
    """status.usage.gpuSeconds in GPU-minutes (one decimal); "-" before any pod was bound."""
    seconds = (status_of(job).get("usage") or {}).get("gpuSeconds")
    return _minutes(seconds) if isinstance(seconds, int) else "-"


def job_row(job: dict[str, Any], now: datetime | None = None) -> list[str]:
    """NAME, NAMESPACE, PHASE, PROGRESS, LOSS, RESTARTS, GPU-MIN, AGE."""
    now = now or datetime.now(UTC)
    meta = job.get("metadata", {})
    progress = progress_of(job)
    steps = f"{progress.step}/{progress.total_steps}" if progress.total_steps else str(progress.step)
    return [
        str(meta.get("name", "")),
        str(meta.get("namespace", "")),
        phase_of(job),
        steps,
        fmt_loss(progress.loss),
        str(restarts_of(job)),
        gpu_minutes(job),
        age(meta.get("creationTimestamp"), now),
    ]


def condition_rows(job: dict[str, Any]) -> list[list[str]]:
    """TYPE, STATUS, REASON, MESSAGE, LAST TRANSITION for each condition."""
    keys = ("type", "status", "reason", "message", "lastTransitionTime")
    conditions = status_of(job).get("conditions") or []
    return [[str(c.get(k, "")) for k in keys] for c in conditions if isinstance(c, dict)]


def usage_text(usage: Any) -> str | None:
    """status.usage as "12.5 GPU-min (3 pods x 4 GPUs, 187 pod-s)"; None before any pod was bound."""
    if not isinstance(usage, dict) or not isinstance(usage.get("podSeconds"), int):
        return None
    pods = usage.get("pods")
    listed = len(pods) if isinstance(pods, list) else 0
    gpus = usage.get("gpusPerPod", 0)
    more = "+" if usage.get("earlierPodSeconds") else ""  # older pods folded out of the list
    return (
        f"{_minutes(usage.get('gpuSeconds', 0))} GPU-min ({listed}{more} pod(s) x {gpus} GPU(s), "
        f"{usage['podSeconds']} pod-s)"
    )


def detail_rows(job: dict[str, Any]) -> list[tuple[str, str]]:
    """Key facts for `status`: phase, progress, attempt, restarts, checkpoint, outputs, times."""
    status = status_of(job)
    progress = progress_of(job)
    rows: list[tuple[str, str]] = [("phase", phase_of(job)), ("progress", progress.describe())]
    if status.get("message"):
        rows.append(("message", str(status["message"])))
    rows.append(("attempt", str(status.get("attempt", 0))))
    restarts = status.get("restarts")
    if isinstance(restarts, dict) and restarts:
        rows.append(("restarts", ", ".join(f"{k} {v}" for k, v in sorted(restarts.items()))))
    redone = (status.get("progress") or {}).get("stepsRedone")
    if isinstance(redone, int) and redone > 0:
        rows.append(("steps redone", f"{redone} (lost to restarts between a checkpoint and a hard kill)"))
    gpu_time = usage_text(status.get("usage"))
    if gpu_time:
        rows.append(("gpu time", gpu_time))
    checkpoint = status.get("lastCheckpoint")
    if isinstance(checkpoint, dict) and checkpoint:
        rows.append(("last checkpoint", f"step {checkpoint.get('step')} {checkpoint.get('uri', '')}".strip()))
    outputs = status.get("outputs")
    if isinstance(outputs, dict):
        rows.extend((key, str(outputs[key])) for key in ("modelUri", "samplesUri") if outputs.get(key))
        evaluation = outputs.get("evaluation")
        if isinstance(evaluation, dict):
            rows.extend((f"evaluation {k}", f"{v:.4g}" if isinstance(v, float) else str(v))
                        for k, v in sorted(evaluation.items()))  # fmt: skip
        if outputs.get("qualityGate"):
            reason = outputs.get("qualityGateReason")
            rows.append(
                ("quality gate", f"{outputs['qualityGate']}: {reason}" if reason else str(outputs["qualityGate"]))
            )
        for key, label in (("evaluationUri", "evaluation detail"), ("evaluationError", "evaluation error")):
            if outputs.get(key):
                rows.append((label, str(outputs[key])))
    rows.extend((key, str(status[key])) for key in ("startTime", "completionTime") if status.get(key))
    return rows

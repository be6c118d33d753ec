"""Success policy: when the job has succeeded, and what it produced (status.outputs, the final step and loss)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dreambooth_api.constants import JobConditionType, JobPhase, Reason
from dreambooth_api.evaluation import QualityGate
from dreambooth_api.job import DreamBoothJobSpec, Outputs, Progress
from dreambooth_api.job import progress_text as format_progress
from dreambooth_operator import podstate
from dreambooth_operator.observed import Attempt
from dreambooth_operator.plan import PlanBuilder
from dreambooth_operator.policies.progress import record_checkpoint, rounded


def succeeded(batch_job: Mapping[str, Any] | None) -> bool:
    """The Indexed Job completed: every rank exited 0."""
    finished = podstate.job_finished(batch_job) if batch_job else None
    return finished is not None and finished[0] == "Complete"


def rank0_result(pods: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Rank 0's termination message of a succeeded attempt (empty when it is gone)."""
    for pod in pods:
        if podstate.pod_rank(pod) == 0 and podstate.exit_code(pod) == 0:
            return podstate.termination_message(pod)
    return {}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def outputs(result: Mapping[str, Any], output_uri: str | None) -> dict[str, Any]:
    """status.outputs from the result (docs/contracts.md), falling back to the storage layout."""
    base = (output_uri or "").rstrip("/")
    out: dict[str, Any] = {
        "modelUri": result.get("modelUri") or (f"{base}/model" if base else None),
        "samplesUri": result.get("samplesUri") or (f"{base}/samples" if base else None),
    }
    evaluation = result.get("evaluation")
    if isinstance(evaluation, Mapping):
        # Only finite scores: a NaN in the status would make every later status write fail.
        out["evaluation"] = {str(k)[:64]: float(v) for k, v in evaluation.items() if _finite(v)}
        out["score"] = out["evaluation"].get("dino")
    for key, limit in (("evaluationUri", 1024), ("qualityGate", 16), ("qualityGateReason", 512)):
        if isinstance(result.get(key), str):
            out[key] = result[key][:limit]
    if isinstance(result.get("evaluationError"), str):
        out["evaluationError"] = result["evaluationError"][:512]
    return {k: v for k, v in out.items() if v is not None}


def quality_gate(b: PlanBuilder, outputs: Outputs) -> None:
    """The QualityGateFailed condition from the gate of a succeeded job (none when it had no gate)."""
    gate, reason = outputs.quality_gate, outputs.quality_gate_reason or ""
    if gate == QualityGate.FAILED:
        b.condition(JobConditionType.QUALITY_GATE_FAILED, True, Reason.SCORE_BELOW_MINIMUM, reason)
    elif gate == QualityGate.PASSED:
        b.condition(JobConditionType.QUALITY_GATE_FAILED, False, Reason.QUALITY_GATE_PASSED, reason)
    elif gate == QualityGate.UNKNOWN:
        b.condition(JobConditionType.QUALITY_GATE_FAILED, False, Reason.JUDGE_UNKNOWN, reason)


def apply(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt) -> bool:
    """True once the attempt's batch Job completed: the job Succeeded with rank 0's outputs, step and loss."""
    if not succeeded(attempt.batch_job):
        return False
    now = b.obs.now
    result = rank0_result(attempt.pods)
    b.status.outputs = Outputs.model_validate(outputs(result, spec.output.get("uri")))
    if isinstance(result.get("lastCheckpoint"), Mapping):
        record_checkpoint(b, result["lastCheckpoint"])
    steps = result.get("steps")
    if isinstance(steps, int):
        total = b.status.progress.total_steps if b.status.progress else steps
        b.status.progress = (b.status.progress or Progress()).model_copy(
            update={"step": steps, "total_steps": max(total, steps), "stage": "Succeeded", "updated_at": now}
        )
        b.status.progress_text = format_progress(steps, max(total, steps))
    if _finite(result.get("finalLoss")) and b.status.progress is not None:
        b.status.progress.loss = rounded(float(result["finalLoss"]))
    b.phase(JobPhase.SUCCEEDED, f"the model is at {b.status.outputs.model_uri}")
    b.condition(JobConditionType.SUCCEEDED, True, Reason.TRAINING_COMPLETED, b.status.message or "")
    b.condition(JobConditionType.RUNNING, False, Reason.TRAINING_COMPLETED, "training completed")
    quality_gate(b, b.status.outputs)
    b.status.completion_time = b.status.completion_time or now
    return True

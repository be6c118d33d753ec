"""Success policy: when the job has succeeded, and what it produced."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dreambooth_operator import podstate


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


def outputs(result: Mapping[str, Any], output_uri: str | None) -> dict[str, Any]:
    """status.outputs from the result (docs/contracts.md), falling back to the storage layout."""
    base = (output_uri or "").rstrip("/")
    out: dict[str, Any] = {
        "modelUri": result.get("modelUri") or (f"{base}/model" if base else None),
        "samplesUri": result.get("samplesUri") or (f"{base}/samples" if base else None),
    }
    evaluation = result.get("evaluation")
    if isinstance(evaluation, Mapping):
        out["evaluation"] = {str(k): float(v) for k, v in evaluation.items() if isinstance(v, int | float)}
    return {k: v for k, v in out.items() if v is not None}

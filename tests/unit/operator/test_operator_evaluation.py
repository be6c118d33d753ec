"""The operator and evaluation: status.outputs from the trainer's result, the QualityGateFailed condition, the score
histogram, and the VLM's API key as a secretKeyRef on the training pods (never its value in the ConfigMap)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from dreambooth_api import env
from dreambooth_api.job import DreamBoothJobStatus
from dreambooth_operator.builders import build_batch_job, build_configmap
from dreambooth_operator.handlers.jobs import record_metrics
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.policies.success import outputs
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import cond, run
from tests.unit.operator.test_operator_builders import SETTINGS

SCORES = {"dino": 0.61, "clipI": 0.8, "clipT": 0.3, "baseDino": 0.2, "baseClipI": 0.5, "baseClipT": 0.31,
          "conceptPreservation": 1.5, "promptFollowing": 3.25}  # fmt: skip
VLM = {"baseUrl": "http://vlm:8000/v1", "model": "m", "credentialsSecret": {"name": "vlm-key", "key": "token"}}


def _message(gate: str | None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"status": "succeeded", "modelUri": "s3://bucket/out/cat/model", "steps": 10}
    doc |= {"evaluation": SCORES, "evaluationUri": "s3://bucket/out/cat/evaluation"}
    if gate is not None:
        doc |= {"qualityGate": gate, "qualityGateReason": "conceptPreservation 1.50 below minScore 2"}
    return doc | extra


def _succeed(message: dict[str, Any]) -> Any:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    return job, run(job, [make_batch_job(job).complete().obj()], [make_pod(job).exited(0, message).obj()])


def test_outputs_carry_the_scores_the_gate_and_the_headline_score() -> None:
    got = outputs(_message("failed"), "s3://bucket/out/cat")
    assert got["evaluation"] == SCORES
    assert got["score"] == 0.61
    assert (got["qualityGate"], got["evaluationUri"]) == ("failed", "s3://bucket/out/cat/evaluation")
    assert got["qualityGateReason"] == "conceptPreservation 1.50 below minScore 2"
    too_long = outputs({"qualityGateReason": "x" * 5000, "evaluationError": "y" * 5000, "qualityGate": 3}, None)
    assert (len(too_long["qualityGateReason"]), len(too_long["evaluationError"])) == (512, 512)
    assert "qualityGate" not in too_long  # not a string: left out
    assert "score" not in outputs({"evaluation": {"clipI": 0.8}}, None)


@pytest.mark.parametrize(
    ("gate", "condition"),
    [
        ("failed", ("True", "ScoreBelowMinimum")),
        ("passed", ("False", "QualityGatePassed")),
        ("unknown", ("False", "JudgeUnknown")),
        ("skipped", None),
        (None, None),
    ],
)
def test_the_gate_becomes_the_quality_gate_failed_condition(
    gate: str | None, condition: tuple[str, str] | None
) -> None:
    _job, plan = _succeed(_message(gate))
    assert plan.status.phase == "Succeeded"  # a failed gate still succeeds: the model is exported
    assert cond(plan, "Succeeded") == ("True", "TrainingCompleted")
    assert cond(plan, "QualityGateFailed") == condition
    assert plan.status.outputs is not None
    assert plan.status.outputs.evaluation == SCORES
    # Written and read back.
    assert DreamBoothJobStatus.model_validate(plan.status_wire()).outputs == plan.status.outputs


def test_an_evaluation_error_is_reported_without_failing_the_job() -> None:
    _job, plan = _succeed({"status": "succeeded", "steps": 10, "evaluationError": "InvalidInputError: no images"})
    assert plan.status.phase == "Succeeded"
    assert plan.status.outputs is not None
    assert plan.status.outputs.evaluation_error == "InvalidInputError: no images"
    assert plan.status.outputs.evaluation is None
    assert cond(plan, "QualityGateFailed") is None


def test_the_histogram_observes_each_score_once_when_the_job_succeeds() -> None:
    job, plan = _succeed(_message("failed", evaluation={**SCORES, "nan": math.nan}))
    metrics = OperatorMetrics()
    record_metrics(metrics, job, None, plan)
    for metric, value in SCORES.items():
        assert metrics.registry.get_sample_value("dreambooth_operator_evaluation_score_count", {"metric": metric}) == 1
        assert metrics.registry.get_sample_value("dreambooth_operator_evaluation_score_sum", {"metric": metric}) == (
            pytest.approx(value)
        )
    assert metrics.registry.get_sample_value("dreambooth_operator_evaluation_score_count", {"metric": "nan"}) is None
    # A later reconcile in the same phase observes nothing again.
    record_metrics(metrics, {**job, "status": plan.status_wire()}, plan.status.phase, plan)
    assert metrics.registry.get_sample_value("dreambooth_operator_evaluation_score_count", {"metric": "dino"}) == 1
    assert metrics.registry.get_sample_value("dreambooth_operator_evaluation_score_bucket",
                                             {"metric": "conceptPreservation", "le": "1.5"}) == 1  # fmt: skip


def _trainer_env(job: dict[str, Any]) -> list[dict[str, Any]]:
    pod = build_batch_job(job, 0, SETTINGS)["spec"]["template"]["spec"]
    [trainer] = [c for c in pod["containers"] if c["name"] == "trainer"]
    env_vars: list[dict[str, Any]] = trainer["env"]
    return env_vars


def test_the_vlm_key_is_a_secret_key_ref_and_never_in_the_configmap() -> None:
    job = make_job().obj()
    job["spec"]["vlm"] = VLM
    job["spec"]["evaluation"] = {"enabled": True, "judge": True}
    [key] = [e for e in _trainer_env(job) if e["name"] == env.VLM_API_KEY]
    assert key == {"name": "DREAMBOOTH_VLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vlm-key", "key": "token"}}}
    config = json.loads(build_configmap(job)["data"]["config.json"])
    assert config["vlm"]["credentialsSecret"] == {"name": "vlm-key", "key": "token"}  # the reference only
    assert config["evaluation"] == {"enabled": True, "judge": True}


def test_no_vlm_key_env_without_a_credentials_secret() -> None:
    job = make_job().obj()
    assert all(e["name"] != env.VLM_API_KEY for e in _trainer_env(job))
    job["spec"]["vlm"] = {"baseUrl": "http://vlm:8000/v1", "model": "m"}
    assert all(e["name"] != env.VLM_API_KEY for e in _trainer_env(job))

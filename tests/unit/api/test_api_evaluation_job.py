"""spec.evaluation and spec.vlm on the DreamBoothJob: the CEL rules, the operator's twins and the trainer's validators
agree; the sections reach the trainer's JobConfig; the API key never does."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dreambooth_api import job
from dreambooth_api.config import (
    CAPTIONS_NEED_VLM,
    JUDGE_NEEDS_VLM,
    InstanceImagesSpec,
    parse_job_config,
)
from dreambooth_api.evaluation import CaptionMode
from dreambooth_api.generate import job_crd
from dreambooth_api.job import DreamBoothJobSpec, Outputs
from dreambooth_api.schema import Schema
from tests.unit.api.test_api_rules import _apply_defaults, _trainer_error, cel

MIN_SCORE_MESSAGE = "evaluation.minScore needs evaluation.judge: true"
VLM = {"baseUrl": "http://vlm.models:8000/v1", "model": "baidu/ERNIE-4.5-VL-28B-A3B-PT"}


def _spec(*, judge: bool | None, captions: str | None, vlm: bool, min_score: float | None = None) -> dict[str, Any]:
    images: dict[str, Any] = {"uri": "s3://bucket/in", "prompt": "a photo of sks dog", "identifier": "sks"}
    if captions is not None:
        images["captions"] = captions
    spec: dict[str, Any] = {
        "baseModel": {"tiny": True},
        "instanceImages": images,
        "output": {"uri": "s3://bucket/out"},
    }
    evaluation: dict[str, Any] = {"enabled": True}
    if judge is not None:
        evaluation["judge"] = judge
    if min_score is not None:
        evaluation["minScore"] = min_score
    spec["evaluation"] = evaluation
    if vlm:
        spec["vlm"] = dict(VLM)
    schema: Schema = job_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    defaulted: dict[str, Any] = _apply_defaults(schema, spec)
    return defaulted


def _rule(message: str) -> str:
    [rule] = [r["rule"] for r in job.SPEC_RULES if r["message"] == message]
    return rule


@pytest.mark.parametrize("vlm", [False, True])
@pytest.mark.parametrize("captions", [None, "off", "sidecar", "auto"])
@pytest.mark.parametrize("judge", [None, False, True])
def test_vlm_rules_agree_in_cel_the_operator_and_the_trainer(
    judge: bool | None, captions: str | None, vlm: bool
) -> None:
    spec = _spec(judge=judge, captions=captions, vlm=vlm)
    operator_errors = DreamBoothJobSpec.model_validate(spec).cross_section_errors()
    trainer_error = _trainer_error(spec)
    for message, needed in ((JUDGE_NEEDS_VLM, bool(judge)), (CAPTIONS_NEED_VLM, captions == "auto")):
        allowed = vlm or not needed
        assert cel(_rule(message), spec) is allowed, message
        assert (message not in operator_errors) is allowed, message
        assert (message not in trainer_error) is allowed, message


@pytest.mark.parametrize(("judge", "min_score"), [(None, None), (False, None), (True, None), (True, 2.5), (False, 2.5)])
def test_min_score_needs_judge_in_cel_and_the_trainer(judge: bool | None, min_score: float | None) -> None:
    spec = _spec(judge=judge, captions=None, vlm=True, min_score=min_score)
    [rule] = [r["rule"] for r in job.TRAINER_RULES["EvaluationSpec"] if r["message"] == MIN_SCORE_MESSAGE]
    allowed = min_score is None or bool(judge)
    assert cel(rule, spec["evaluation"]) is allowed
    assert (MIN_SCORE_MESSAGE not in _trainer_error(spec)) is allowed


def test_the_crd_rejects_a_judge_without_vlm_and_accepts_the_sections() -> None:
    schema = job_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert {"evaluation", "vlm"} <= set(schema["properties"])
    assert schema["properties"]["instanceImages"]["properties"]["captions"]["enum"] == ["off", "sidecar", "auto"]
    assert schema["properties"]["vlm"]["required"] == ["baseUrl", "model"]


def test_evaluation_and_vlm_reach_the_trainer_config_but_no_key_value() -> None:
    spec = _spec(judge=True, captions="auto", vlm=True, min_score=2.0)
    spec["vlm"]["credentialsSecret"] = {"name": "vlm-key", "key": "token"}
    doc = DreamBoothJobSpec.model_validate(spec).trainer_config("j", "ns")
    config = parse_job_config(doc)
    assert config.evaluation is not None
    assert config.evaluation.judge
    assert config.evaluation.min_score == 2.0
    assert config.vlm is not None
    assert config.vlm.base_url == VLM["baseUrl"]
    assert config.instance_images.captions is CaptionMode.AUTO
    # The Secret's name and key are a reference; the API key itself is only ever in the pod's env.
    assert doc["vlm"]["credentialsSecret"] == {"name": "vlm-key", "key": "token"}
    ref = DreamBoothJobSpec.model_validate(spec).vlm_secret()
    assert ref is not None
    assert (ref.name, ref.key) == ("vlm-key", "token")


def test_a_job_without_vlm_has_no_secret_reference() -> None:
    assert DreamBoothJobSpec.model_validate(_spec(judge=False, captions=None, vlm=False)).vlm_secret() is None


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (True, CaptionMode.SIDECAR),
        (False, CaptionMode.OFF),
        ("auto", CaptionMode.AUTO),
        ("sidecar", CaptionMode.SIDECAR),
    ],
)
def test_captions_reads_the_old_booleans_and_the_modes(value: Any, mode: CaptionMode) -> None:
    spec = InstanceImagesSpec.model_validate({"uri": "s3://bucket/in", "prompt": "a sks dog", "captions": value})
    assert spec.captions is mode
    assert json.loads(spec.model_dump_json(by_alias=True))["captions"] == mode.value


def test_captions_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="captions"):
        InstanceImagesSpec.model_validate({"uri": "s3://bucket/in", "prompt": "a sks dog", "captions": "maybe"})


def test_score_column_points_at_the_outputs_score() -> None:
    columns = {c["name"]: c for c in job_crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Score"]["jsonPath"] == ".status.outputs.score"
    assert columns["Score"]["priority"] == 1
    assert "score" in Outputs.model_fields

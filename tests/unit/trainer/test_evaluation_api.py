"""The evaluation contract: spec defaults and rules, DreamBench prompts, the result's flat scores, CRD schemas."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dreambooth_api.evaluation import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    CaptionMode,
    CaptionsSpec,
    EvaluationResult,
    EvaluationSpec,
    JudgeScores,
    JudgeStatus,
    MetricModelSpec,
    MetricScores,
    StructuredOutput,
    SubjectKind,
    VlmSpec,
    caption_mode,
    fill_prompt,
    split_subject,
    subject_from_prompt,
)
from dreambooth_api.schema import model_json_schema, to_structural


def test_dreambench_prompt_lists() -> None:
    for prompts in (OBJECT_PROMPTS, LIVE_PROMPTS):
        assert len(prompts) == 25
        assert len(set(prompts)) == 25
        assert all(p.count("{}") == 1 for p in prompts)
    # Both share 10 backgrounds and 5 property changes; objects get 10 more backgrounds, live subjects 10 outfits.
    shared = set(OBJECT_PROMPTS) & set(LIVE_PROMPTS)
    assert len(shared) == 15
    assert "a {} wearing a santa hat" in set(LIVE_PROMPTS) - shared
    assert "a {} floating in an ocean of milk" in set(OBJECT_PROMPTS) - shared
    assert OBJECT_PROMPTS[-5:] == LIVE_PROMPTS[-5:] == ("a red {}", "a purple {}", "a shiny {}", "a wet {}",
                                                       "a cube shaped {}")  # fmt: skip


def test_spec_defaults_and_templates() -> None:
    spec = EvaluationSpec()
    assert not spec.enabled
    assert spec.dino() == MetricModelSpec(id=DEFAULT_DINO_MODEL)
    assert spec.clip() == MetricModelSpec(id=DEFAULT_CLIP_MODEL)
    assert EvaluationSpec.model_validate({"dinoModel": {"tiny": True}}).dino() == MetricModelSpec(tiny=True)
    assert spec.templates() == list(OBJECT_PROMPTS)
    assert EvaluationSpec(subject_kind=SubjectKind.LIVE).templates() == list(LIVE_PROMPTS)
    own = EvaluationSpec.model_validate({"prompts": ["a {} on a boat", "{} in {} style"]})
    assert own.templates() == ["a {} on a boat", "{} in {} style"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"minScore": 3.0}, "minScore needs evaluation.judge"),
        ({"judge": True, "minScore": 4.5}, "less than or equal to 4"),
        ({"prompts": ["a photo of a dog"]}, "should match pattern"),
        ({"prompts": []}, "at least 1 item"),
        ({"imagesPerPrompt": 0}, "greater than or equal to 1"),
        ({"dinoModel": {"id": "a/b", "uri": "file:///m"}}, "exactly one of id, uri or tiny"),
        ({"clipModel": {}}, "exactly one of id, uri or tiny"),
        ({"referenceImages": "http://x/y"}, "should match pattern"),
        ({"unknownField": 1}, "Extra inputs are not permitted"),
    ],
)
def test_spec_rules(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EvaluationSpec.model_validate(data)


def test_metric_model_identity() -> None:
    assert MetricModelSpec(id="facebook/dino-vits16", revision="abc").identity() == "hub:facebook/dino-vits16@abc"
    assert MetricModelSpec(uri="s3://bucket/models/dino").identity() == "uri:s3://bucket/models/dino"
    assert MetricModelSpec(tiny=True).identity() == "tiny"


def test_fill_and_split_subject() -> None:
    assert fill_prompt("a {} in the jungle", "sks dog") == "a sks dog in the jungle"
    assert fill_prompt("{} next to another {}", "sks dog") == "sks dog next to another sks dog"
    assert fill_prompt("a {} with {braces}", "x") == "a x with {braces}"  # only {} is a placeholder
    assert subject_from_prompt("a photo of sks dog", "sks") == "sks dog"
    assert subject_from_prompt("sks dog, sitting", "sks") == "sks dog"
    assert subject_from_prompt("a photo of sks", "sks") == "sks"
    assert subject_from_prompt("a photo of a dog", "sks") == "sks"
    assert split_subject("sks dog") == ("sks", "dog")
    assert split_subject("sks stuffed animal") == ("sks", "stuffed animal")
    assert split_subject("red sks backpack", identifier="sks") == ("sks", "red backpack")
    assert split_subject("sks") == ("sks", "")
    with pytest.raises(ValueError, match="empty"):
        split_subject("  ")


def test_vlm_spec() -> None:
    spec = VlmSpec.model_validate(
        {
            "baseUrl": "http://ernie-vl.models:8000/v1",
            "model": "baidu/ERNIE-4.5-VL-28B-A3B-PT",
            "credentialsSecret": {"name": "vlm-key"},
            "extraBody": {"chat_template_kwargs": {"enable_thinking": False}},
        }
    )
    assert spec.credentials_secret is not None
    assert spec.credentials_secret.key == "apiKey"
    assert spec.structured_output is StructuredOutput.AUTO
    assert (spec.timeout_seconds, spec.max_retries, spec.max_concurrency, spec.max_image_side) == (120.0, 3, 4, 768)
    with pytest.raises(ValidationError, match="should match pattern"):
        VlmSpec(base_url="ftp://x/v1", model="m")


def test_caption_mode_accepts_the_old_boolean() -> None:
    assert caption_mode(True) is CaptionMode.SIDECAR
    assert caption_mode(False) is CaptionMode.OFF
    assert caption_mode("auto") is CaptionMode.AUTO
    assert CaptionsSpec().overwrite is False


def test_result_scores_are_the_flat_status_map() -> None:
    result = EvaluationResult(
        trained=MetricScores(dino=0.6, clip_i=0.8, clip_t=0.3),
        base=MetricScores(dino=0.2, clip_i=0.6, clip_t=0.31),
        judge=JudgeScores(
            status=JudgeStatus.SCORED, concept_preservation=3.0, prompt_following=3.5, samples=2, scored=2
        ),
    )
    assert result.scores() == {
        "dino": 0.6, "clipI": 0.8, "clipT": 0.3, "baseDino": 0.2, "baseClipI": 0.6, "baseClipT": 0.31,
        "conceptPreservation": 3.0, "promptFollowing": 3.5,
    }  # fmt: skip
    unknown = result.model_copy(update={"base": None, "judge": JudgeScores(status=JudgeStatus.UNKNOWN, reason="x")})
    assert unknown.scores() == {"dino": 0.6, "clipI": 0.8, "clipT": 0.3}
    # A newer trainer's extra fields do not break an older reader.
    assert EvaluationResult.model_validate({**result.to_wire(), "newField": 1}) == result


@pytest.mark.parametrize("model", [EvaluationSpec, VlmSpec, CaptionsSpec])
def test_specs_have_structural_crd_schemas(model: type[EvaluationSpec | VlmSpec | CaptionsSpec]) -> None:
    schema = to_structural(model_json_schema(model))
    assert schema["type"] == "object"
    props = schema["properties"]
    assert all("description" in p for p in props.values())
    if model is VlmSpec:
        assert props["extraBody"]["x-kubernetes-preserve-unknown-fields"] is True
        assert schema["required"] == ["baseUrl", "model"]
    if model is EvaluationSpec:
        assert "default" not in props["dinoModel"]  # unset means the default model, resolved by the trainer
        assert props["prompts"]["items"]["pattern"] == r"\{\}"

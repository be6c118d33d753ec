"""`run_evaluation` end to end on the tiny Stable Diffusion pipeline, tiny metric models and the fake VLM."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dreambooth_api.config import BaseModelSpec, Sampler
from dreambooth_api.evaluation import (
    EvaluationResult,
    EvaluationSpec,
    JudgeStatus,
    QualityGate,
    VlmSpec,
)
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.vlm.client import VlmClient
from dreambooth_trainer.components import Components, load_components
from dreambooth_trainer.evaluation.judge import CONCEPT_TASK
from dreambooth_trainer.evaluation.metrics import MetricModels, load_metric_models
from dreambooth_trainer.evaluation.outputs import EVALUATION_FILE, GAP, GRID_FILE, RESULT_FILE
from dreambooth_trainer.evaluation.runner import NO_VLM_REASON, generate_samples, load_images, run_evaluation
from dreambooth_trainer.pipelines import build_pipeline
from dreambooth_trainer.storage import ObjectStore
from tests.infra.fake_vlm import FakeVlm, Reply, vllm_reply
from tests.infra.processes import free_port

SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"
TINY_METRICS = {"dinoModel": {"tiny": True}, "clipModel": {"tiny": True}}


@pytest.fixture(scope="module")
def components() -> Components:
    return load_components(BaseModelSpec(tiny=True), ObjectStore(), SHARED_MODELS)


def pipeline(c: Components) -> Any:
    return build_pipeline(c.unet, c.vae, c.text_encoder, c.tokenizer, c.noise_scheduler.config, Sampler.DDIM)


@pytest.fixture(scope="module")
def metric_models() -> MetricModels:
    return load_metric_models(EvaluationSpec.model_validate(TINY_METRICS), SHARED_MODELS)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeVlm]:
    with FakeVlm() as server:
        yield server


def spec(**fields: Any) -> EvaluationSpec:
    base = {"enabled": True, "prompts": ["a {} on the beach", "a red {}"], "imagesPerPrompt": 2,
            "numInferenceSteps": 2, **TINY_METRICS}  # fmt: skip
    return EvaluationSpec.model_validate({**base, **fields})


REFERENCES = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 180, 40))]


def judge_scores(concept: int, follow: int) -> Any:
    def reply(body: dict[str, Any]) -> Reply:
        name = body["response_format"]["json_schema"]["name"]
        return vllm_reply(f'{{"reason": "r", "score": {concept if name == CONCEPT_TASK else follow}}}')

    return reply


def test_end_to_end_with_base_model_and_judge(components: Components, server: FakeVlm, tmp_path: Path) -> None:
    server.reset(responder=judge_scores(3, 4))
    built: list[Any] = []
    steps: list[tuple[str, int, int]] = []

    def base_factory() -> Any:
        built.append(pipeline(components))
        return built[-1]

    with VlmClient(VlmSpec(base_url=server.base_url, model="m")) as client:
        result = run_evaluation(
            pipeline(components),
            spec(judge=True, minScore=3.0),
            REFERENCES,
            "sks dog",
            tmp_path,
            vlm_client=client,
            base_pipeline=base_factory,
            cache_dir=SHARED_MODELS,
            progress=lambda *step: steps.append(step),
        )

    assert len(built) == 1
    assert steps == [("trained", 1, 2), ("trained", 2, 2), ("base", 1, 2), ("base", 2, 2)]
    assert result.quality_gate is QualityGate.PASSED
    assert result.judge is not None
    assert result.judge.status is JudgeStatus.SCORED
    assert (result.judge.concept_preservation, result.judge.prompt_following, result.judge.scored) == (3.0, 4.0, 4)
    assert len(server.requests) == 8  # 2 prompts x 2 samples x (concept, prompt)
    assert (result.images_per_prompt, result.reference_images, result.dino_model) == (2, 2, "tiny")
    for value in (result.trained.dino, result.trained.clip_i, result.trained.clip_t):
        assert value is not None
        assert -1.0 <= value <= 1.0
    assert result.base == result.trained  # the same weights and seeds give the same samples

    first, second = result.prompts
    assert (first.prompt, first.text_prompt, first.seeds) == ("a sks dog on the beach", "a dog on the beach", [0, 1])
    assert (second.prompt, second.text_prompt, second.seeds) == ("a red sks dog", "a red dog", [2, 3])
    assert first.images == ["evaluation/trained/p00-i0.png", "evaluation/trained/p00-i1.png"]
    assert second.base_images == ["evaluation/base/p01-i0.png", "evaluation/base/p01-i1.png"]
    assert [j.image for j in first.judgements] == first.images
    for name in first.images + second.base_images:
        assert Image.open(tmp_path / name).size == (32, 32)

    assert EvaluationResult.model_validate_json((tmp_path / RESULT_FILE).read_text()) == result
    assert json.loads((tmp_path / EVALUATION_FILE).read_text()) == result.scores()
    assert set(result.scores()) == {"dino", "clipI", "clipT", "baseDino", "baseClipI", "baseClipT",
                                    "conceptPreservation", "promptFollowing"}  # fmt: skip
    assert result.grid == GRID_FILE
    assert Image.open(tmp_path / GRID_FILE).size == (4 * 32 + GAP, 2 * 32)


def test_samples_have_their_own_seeds(components: Components) -> None:
    pipe = pipeline(components)
    both = generate_samples(pipe, ["a sks dog"], spec(imagesPerPrompt=2, seed=10))
    second_alone = generate_samples(pipe, ["a sks dog"], spec(imagesPerPrompt=1, seed=11))
    a, b = (np.asarray(img, dtype=np.int16) for img in (both[0][1], second_alone[0][0]))
    assert np.abs(a - b).max() <= 1  # sample 1 of a batch is the sample of seed + 1 alone
    assert not np.array_equal(np.asarray(both[0][0]), np.asarray(both[0][1]))


@pytest.mark.parametrize(
    ("scores", "vlm", "gate", "reason"),
    [
        ((1, 4), "fake", QualityGate.FAILED, "conceptPreservation 1.00 below minScore 3"),
        (None, "none", QualityGate.UNKNOWN, f"the judge's scores are unknown: {NO_VLM_REASON}"),
        (
            None,
            "unreachable",
            QualityGate.UNKNOWN,
            "the judge's scores are unknown: only 0 of 2 samples were scored: "
            "the VLM endpoint is unreachable (after retries)",
        ),
    ],
    ids=["below-min-score", "no-vlm", "unreachable"],
)
def test_quality_gate_outcomes(
    components: Components,
    metric_models: MetricModels,
    server: FakeVlm,
    tmp_path: Path,
    scores: tuple[int, int] | None,
    vlm: str,
    gate: QualityGate,
    reason: str,
) -> None:
    client = None
    if vlm == "fake" and scores is not None:
        server.reset(responder=judge_scores(*scores))
        client = VlmClient(VlmSpec(base_url=server.base_url, model="m"))
    elif vlm == "unreachable":
        client = VlmClient(VlmSpec(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", max_retries=0))
    result = run_evaluation(
        lambda: pipeline(components),
        spec(judge=True, minScore=3.0, prompts=["a {}"], imagesPerPrompt=2, baseline=False),
        REFERENCES,
        "sks dog",
        tmp_path,
        vlm_client=client,
        base_pipeline=lambda: pytest.fail("baseline: false must not build the base pipeline"),
        metric_models=metric_models,
    )
    assert result.quality_gate is gate
    assert result.quality_gate_reason.startswith(reason)
    assert result.base is None
    assert "conceptPreservation" not in result.scores() or gate is QualityGate.FAILED
    if client is not None:
        client.close()


def test_needs_references(components: Components, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one reference image"):
        run_evaluation(pipeline(components), spec(), [], "sks dog", tmp_path)


def test_reference_images_from_a_prefix(tmp_path: Path) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        Image.new("RGB", (20 + i, 20), (i, 0, 0)).save(refs / f"r{i}.jpg")
    (refs / "r0.txt").write_text("a caption, not an image")
    images = load_images(ObjectStore(), refs.as_uri(), max_images=2)
    assert [img.size for img in images] == [(20, 20), (21, 20)]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="no images"):
        load_images(ObjectStore(), (tmp_path / "empty").as_uri())

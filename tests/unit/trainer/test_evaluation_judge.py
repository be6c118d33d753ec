"""DreamBench++-style judging on the fake VLM, the judge's summary, and the quality gate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from dreambooth_api.evaluation import JudgeScores, JudgeStatus, QualityGate, SampleJudgement, VlmSpec
from dreambooth_api.vlm.client import VlmClient
from dreambooth_trainer.evaluation.judge import (
    CONCEPT_TASK,
    MAX_REFERENCES,
    PROMPT_TASK,
    judge_samples,
    quality_gate,
    summarize,
)
from tests.infra.fake_vlm import FakeVlm, Reply, answer_text, error_reply, fastdeploy_reply, image_urls


def j(cp: int | None, pf: int | None, reason: str = "down") -> SampleJudgement:
    return SampleJudgement(
        image="x.png",
        concept_preservation=cp,
        concept_reason="ok" if cp is not None else reason,
        prompt_following=pf,
        prompt_reason="ok" if pf is not None else reason,
    )


def test_summary_means_over_scored_samples() -> None:
    scores = summarize([j(4, 3), j(2, 4), j(3, 2)])
    assert scores == JudgeScores(status=JudgeStatus.SCORED, concept_preservation=3.0, prompt_following=3.0,
                                 samples=3, scored=3)  # fmt: skip
    partial = summarize([j(4, 3), j(2, 4), j(None, 1, "timed out")])
    assert partial.status is JudgeStatus.SCORED
    assert (partial.concept_preservation, partial.prompt_following, partial.scored) == (3.0, 2.6667, 2)
    assert partial.reason == "1 of 3 samples were not scored: timed out"


def test_summary_is_unknown_when_too_few_were_scored() -> None:
    scores = summarize([j(4, 3), j(None, None, "unreachable"), j(None, 2, "unreachable")])
    assert scores.status is JudgeStatus.UNKNOWN
    assert scores.reason == "only 1 of 3 samples were scored: unreachable"
    assert scores.concept_preservation is None
    assert summarize([]).reason == "no samples to judge"


@pytest.mark.parametrize(
    ("cp", "pf", "min_score", "gate", "reason"),
    [
        (3.5, 3.2, None, QualityGate.SKIPPED, "no minScore is set"),
        (3.5, 3.2, 3.0, QualityGate.PASSED, "conceptPreservation 3.50 and promptFollowing 3.20 reach minScore 3"),
        (3.0, 3.0, 3.0, QualityGate.PASSED, "conceptPreservation 3.00 and promptFollowing 3.00 reach minScore 3"),
        (2.5, 3.2, 3.0, QualityGate.FAILED, "conceptPreservation 2.50 below minScore 3"),
        (2.5, 1.0, 2.75, QualityGate.FAILED, "conceptPreservation 2.50 and promptFollowing 1.00 below minScore 2.75"),
    ],
)
def test_quality_gate(cp: float, pf: float, min_score: float | None, gate: QualityGate, reason: str) -> None:
    scores = JudgeScores(status=JudgeStatus.SCORED, concept_preservation=cp, prompt_following=pf, samples=1, scored=1)
    assert quality_gate(scores, min_score) == (gate, reason)


def test_quality_gate_without_scores() -> None:
    unknown = JudgeScores(status=JudgeStatus.UNKNOWN, reason="the VLM endpoint is unreachable")
    assert quality_gate(unknown, 3.0) == (
        QualityGate.UNKNOWN,
        "the judge's scores are unknown: the VLM endpoint is unreachable",
    )
    assert quality_gate(None, 3.0) == (QualityGate.SKIPPED, "the judge is off")
    assert quality_gate(None, None)[0] is QualityGate.SKIPPED


@pytest.fixture
def server() -> Iterator[FakeVlm]:
    with FakeVlm() as server:
        yield server


def _judge_reply(body: dict[str, Any]) -> Reply:
    name = body["response_format"]["json_schema"]["name"]
    score = {CONCEPT_TASK: 3, PROMPT_TASK: 4}[name]
    return fastdeploy_reply(f'{{"reason": "{name} looks right", "score": {score}}}')


def test_judge_samples_on_the_fake_vlm(server: FakeVlm) -> None:
    server.reset(responder=_judge_reply)
    refs = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(5)]
    samples = [[Image.new("RGB", (8, 8), "blue"), Image.new("RGB", (8, 8), "green")], [Image.new("RGB", (8, 8))]]
    names = [["a0.png", "a1.png"], ["b0.png"]]
    with VlmClient(VlmSpec(base_url=server.base_url, model="m")) as client:
        judgements = judge_samples(client, refs, samples, ["a dog on the beach", "a red dog"], names)

    assert [[x.image for x in row] for row in judgements] == names
    assert all(x.concept_preservation == 3 and x.prompt_following == 4 for row in judgements for x in row)
    assert judgements[0][0].concept_reason == "concept_preservation looks right"
    assert len(server.requests) == 6
    by_task: dict[str, list[dict[str, Any]]] = {}
    for body in server.bodies():
        by_task.setdefault(body["response_format"]["json_schema"]["name"], []).append(body)
    concept, follow = by_task[CONCEPT_TASK], by_task[PROMPT_TASK]
    assert len(image_urls(concept[0])) == MAX_REFERENCES + 1  # references, then the sample
    assert len(image_urls(follow[0])) == 1
    texts = [p["text"] for p in concept[0]["messages"][0]["content"] if p["type"] == "text"]
    assert texts[1:5] == ["Reference image 1:", "Reference image 2:", "Reference image 3:", "Generated sample:"]
    prompts = sorted(answer_text(b).split('"')[1] for b in follow)
    assert prompts == ["a dog on the beach", "a dog on the beach", "a red dog"]  # the class, no identifier
    assert summarize([x for row in judgements for x in row]).concept_preservation == 3.0


def test_judge_with_the_endpoint_down_is_unknown(server: FakeVlm) -> None:
    server.reset(responder=lambda _body: error_reply(503, "overloaded"))
    with VlmClient(VlmSpec(base_url=server.base_url, model="m", max_retries=0)) as client:
        judgements = judge_samples(client, [Image.new("RGB", (8, 8))], [[Image.new("RGB", (8, 8))]], ["a dog"],
                                   [["a.png"]])  # fmt: skip
    [[sample]] = judgements
    assert sample.concept_preservation is None
    assert sample.prompt_following is None
    assert sample.concept_reason == "the VLM endpoint answered HTTP 503: Error code: 503 - overloaded"
    summary = summarize([sample])
    assert summary.status is JudgeStatus.UNKNOWN
    assert quality_gate(summary, 2.0)[0] is QualityGate.UNKNOWN

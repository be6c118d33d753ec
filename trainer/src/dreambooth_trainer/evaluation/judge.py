"""DreamBench++-style judging of evaluation samples by a vision-language model, and the quality gate.

DreamBench++ (Peng et al., 2024) scores personalised generations with a multimodal judge on two axes, each an integer
from 0 to 4: concept preservation (the sample against the reference images) and prompt following (the sample against
the prompt). Each sample gets two requests; the judge first writes a one-sentence reason, then the score (reasoning
before scoring makes the scores steadier). The prompt the judge sees names the subject by its class ("a dog in the
jungle"): the identifier means nothing to it.

The summary's means cover the samples that got a score; when fewer than half of the samples did, the judge's result
is unknown. The quality gate (`quality_gate`) needs both means to reach `minScore`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from statistics import fmean
from typing import TYPE_CHECKING

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from dreambooth_api.evaluation import JudgeScores, JudgeStatus, QualityGate, SampleJudgement
from dreambooth_api.vlm.tasks import VlmAnswer, VlmTask

if TYPE_CHECKING:
    from dreambooth_api.vlm.client import VlmClient

CONCEPT_TASK = "concept_preservation"
PROMPT_TASK = "prompt_following"
# References sent with each concept-preservation request (more cost tokens, rarely change the score).
MAX_REFERENCES = 3
# The judge's result is unknown when fewer than this fraction of the samples were scored.
MIN_SCORED_FRACTION = 0.5

CONCEPT_INSTRUCTION = (
    "You judge a personalised text-to-image model. The first {count} image(s) show the reference subject; the last "
    'image is a sample generated for the prompt "{prompt}".\n'
    "Rate how well the sample preserves the reference subject's identity: its shape, proportions, colours, "
    "textures, patterns, markings and distinctive details (for an animal or a person, also the face). Ignore the "
    "background, the pose, the image style and any change the prompt asks for (a colour, an outfit, a shape).\n"
    "0: the subject is missing or a different kind of thing; 1: only the kind of thing matches; 2: some features "
    "match, major ones differ; 3: the same subject with minor differences; 4: the same subject, every detail kept.\n"
    "First give a one-sentence reason, then the integer score."
)
PROMPT_INSTRUCTION = (
    'You judge a text-to-image model. The image was generated for the prompt "{prompt}".\n'
    "Rate how well the image follows the prompt: every object, attribute, setting and style it asks for. Ignore "
    "image quality unless it hides what the prompt asks for.\n"
    "0: unrelated to the prompt; 1: only the main subject matches; 2: some of the prompt is shown, major parts are "
    "missing; 3: most of the prompt is shown, a minor part is missing; 4: everything in the prompt is shown.\n"
    "First give a one-sentence reason, then the integer score."
)


class ScoreAnswer(BaseModel):
    """The judge's answer: a short reason, then a score from 0 to 4."""

    # Extra keys in an answer are ignored; the schema sent still forbids them (strict structured output needs it).
    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})

    reason: str = Field(max_length=2000)
    score: int = Field(ge=0, le=4)


def concept_task(references: Sequence[Image.Image], sample: Image.Image, prompt: str) -> VlmTask[ScoreAnswer]:
    """The concept-preservation question: references, then the sample."""
    refs = list(references)[:MAX_REFERENCES]
    parts: list[str | Image.Image] = [CONCEPT_INSTRUCTION.format(count=len(refs), prompt=prompt)]
    for i, ref in enumerate(refs, start=1):
        parts += [f"Reference image {i}:", ref]
    parts += ["Generated sample:", sample]
    return VlmTask(CONCEPT_TASK, tuple(parts), ScoreAnswer)


def prompt_task(sample: Image.Image, prompt: str) -> VlmTask[ScoreAnswer]:
    """The prompt-following question: the prompt, then the sample."""
    return VlmTask(PROMPT_TASK, (PROMPT_INSTRUCTION.format(prompt=prompt), "Generated image:", sample), ScoreAnswer)


def _judgement(name: str, concept: VlmAnswer[ScoreAnswer], follow: VlmAnswer[ScoreAnswer]) -> SampleJudgement:
    return SampleJudgement(
        image=name,
        concept_preservation=concept.value.score if concept.value else None,
        concept_reason=concept.value.reason if concept.value else concept.reason,
        prompt_following=follow.value.score if follow.value else None,
        prompt_reason=follow.value.reason if follow.value else follow.reason,
    )


def judge_samples(
    client: VlmClient,
    references: Sequence[Image.Image],
    samples: Sequence[Sequence[Image.Image]],
    prompts: Sequence[str],
    names: Sequence[Sequence[str]],
) -> list[list[SampleJudgement]]:
    """Judge `samples[i][j]` (generated for `prompts[i]`, stored as `names[i][j]`); never raises.

    All requests go out together through the client's thread pool (at most `maxConcurrency` in flight).
    """
    tasks: list[VlmTask[ScoreAnswer]] = []
    for prompt, images in zip(prompts, samples, strict=True):
        for image in images:
            tasks += [concept_task(references, image, prompt), prompt_task(image, prompt)]
    answers = client.ask_many(tasks)
    out: list[list[SampleJudgement]] = []
    k = 0
    for images, image_names in zip(samples, names, strict=True):
        row = []
        for name in image_names[: len(images)]:
            row.append(_judgement(name, answers[k], answers[k + 1]))
            k += 2
        out.append(row)
    return out


def summarize(judgements: Sequence[SampleJudgement]) -> JudgeScores:
    """The judge's means over the scored samples, or unknown (with the commonest reason) when too few were."""
    concept = [j.concept_preservation for j in judgements if j.concept_preservation is not None]
    follow = [j.prompt_following for j in judgements if j.prompt_following is not None]
    scored = sum(1 for j in judgements if j.concept_preservation is not None and j.prompt_following is not None)
    failures = Counter(
        reason
        for j in judgements
        for score, reason in ((j.concept_preservation, j.concept_reason), (j.prompt_following, j.prompt_reason))
        if score is None and reason
    )
    failure = failures.most_common(1)[0][0] if failures else None
    total = len(judgements)
    if total == 0:
        return JudgeScores(status=JudgeStatus.UNKNOWN, reason="no samples to judge")
    if scored < MIN_SCORED_FRACTION * total or not concept or not follow:
        reason = f"only {scored} of {total} samples were scored" + (f": {failure}" if failure else "")
        return JudgeScores(status=JudgeStatus.UNKNOWN, samples=total, scored=scored, reason=reason)
    partial = f"{total - scored} of {total} samples were not scored: {failure}" if scored < total else None
    return JudgeScores(
        status=JudgeStatus.SCORED,
        concept_preservation=round(fmean(concept), 4),
        prompt_following=round(fmean(follow), 4),
        samples=total,
        scored=scored,
        reason=partial,
    )


def unknown_judge(reason: str, samples: int = 0) -> JudgeScores:
    """The judge's result when it could not run at all (no VLM configured, no client)."""
    return JudgeScores(status=JudgeStatus.UNKNOWN, samples=samples, reason=reason)


def quality_gate(judge: JudgeScores | None, min_score: float | None) -> tuple[QualityGate, str]:
    """The gate's decision and why: skipped without minScore or judge, unknown without scores, else both means
    (concept preservation and prompt following) against minScore."""
    if min_score is None:
        return QualityGate.SKIPPED, "no minScore is set"
    if judge is None:
        return QualityGate.SKIPPED, "the judge is off"
    cp, pf = judge.concept_preservation, judge.prompt_following
    if judge.status is JudgeStatus.UNKNOWN or cp is None or pf is None:
        return QualityGate.UNKNOWN, f"the judge's scores are unknown: {judge.reason or 'no scores'}"
    below = [f"{name} {value:.2f}" for name, value in (("conceptPreservation", cp), ("promptFollowing", pf))
             if value < min_score]  # fmt: skip
    if below:
        return QualityGate.FAILED, f"{' and '.join(below)} below minScore {min_score:g}"
    return QualityGate.PASSED, f"conceptPreservation {cp:.2f} and promptFollowing {pf:.2f} reach minScore {min_score:g}"

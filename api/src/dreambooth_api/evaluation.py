"""Evaluation, automatic captions and the judge: the contract between the job spec, the trainer and the status.

- `EvaluationSpec` (`spec.evaluation`): after training, sample DreamBench prompts from the trained model (and the
  base model) and score the samples with the DreamBooth paper's metrics (DINO, CLIP-I, CLIP-T), optionally judged
  by a vision-language model (VLM) with a quality gate.
- `VlmSpec` (`spec.vlm`): an OpenAI-compatible chat-completions endpoint serving a VLM (ERNIE 4.5 VL on vLLM or
  FastDeploy, a hosted provider); the captioner and the judge use it.
- `CaptionsSpec`: how instance images are captioned by the VLM (`instanceImages.captions: auto`).
- `EvaluationResult`: what one evaluation produced; `EvaluationResult.scores()` is the flat map that goes into
  `status.outputs.evaluation` and `<output>/evaluation.json`.

The prompt templates are DreamBench's (Ruiz et al., "DreamBooth", 2023: 25 prompts for objects, 25 for live
subjects), written with `{}` where the subject goes ("a {} in the jungle" -> "a sks dog in the jungle").
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Final, Self

from pydantic import ConfigDict, Field, model_validator

from dreambooth_api import env
from dreambooth_api.common import ApiModel, Bool, CamelModel, DnsSubdomain, Float, Int, Uri


class Model(CamelModel):
    """Base of the evaluation's config models: unknown fields are rejected, as `config.Model` does (not imported
    from there: `config.JobConfig` holds `EvaluationSpec` and `VlmSpec`)."""

    model_config = ConfigDict(extra="forbid")


SUBJECT_PLACEHOLDER: Final = "{}"
"""Where the subject text ("sks dog") goes in a prompt template."""

VLM_API_KEY_ENV: Final = env.VLM_API_KEY
"""The environment variable that holds the VLM's API key (the operator maps `vlm.credentialsSecret` to it)."""

DEFAULT_DINO_MODEL: Final = "facebook/dino-vits16"
"""The DreamBooth paper's DINO: a self-supervised ViT-S/16, whose CLS embedding tells apart subjects of one class."""
DEFAULT_CLIP_MODEL: Final = "openai/clip-vit-base-patch32"
"""CLIP ViT-B/32, the model of the published CLIP-I and CLIP-T numbers (DreamBooth, Textual Inversion)."""

HUB_ID_PATTERN: Final = r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$"

# DreamBench (google/dreambooth, dataset/prompts_and_classes.txt): recontextualisation, accessorisation and
# property modification prompts. Objects get 20 backgrounds and 5 property changes.
OBJECT_PROMPTS: Final[tuple[str, ...]] = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)
"""DreamBench's 25 prompts for objects (toys, cans, backpacks, ...)."""

# Live subjects (pets) get 10 backgrounds, 10 outfits and the same 5 property changes.
LIVE_PROMPTS: Final[tuple[str, ...]] = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)
"""DreamBench's 25 prompts for live subjects (dogs, cats, people)."""


class SubjectKind(StrEnum):
    OBJECT = "object"
    LIVE = "live"


class StructuredOutput(StrEnum):
    """How the VLM is asked for JSON."""

    AUTO = "auto"
    """Ask for `response_format: json_schema`; if the endpoint refuses it (HTTP 400/422), put the schema in the
    prompt for this and every later request."""
    JSON_SCHEMA = "json_schema"
    """Always `response_format: json_schema` (vLLM, FastDeploy and most hosted providers support it)."""
    PROMPT = "prompt"
    """Never send `response_format`; the schema is in the prompt and the answer's first JSON object is parsed."""


class CaptionMode(StrEnum):
    """`instanceImages.captions`: where each instance image's caption comes from."""

    OFF = "off"
    """Every image uses the instance prompt."""
    SIDECAR = "sidecar"
    """Each image has a .txt sidecar written by the user (the existing `captions: true`)."""
    AUTO = "auto"
    """The VLM writes the .txt sidecars before training (existing ones are kept unless `overwriteCaptions`)."""


def caption_mode(value: bool | str) -> CaptionMode:
    """`captions: true/false` (the existing boolean) or a `CaptionMode` value."""
    if isinstance(value, bool):
        return CaptionMode.SIDECAR if value else CaptionMode.OFF
    return CaptionMode(value)


class QualityGate(StrEnum):
    PASSED = "passed"
    """Both judge means are at least `minScore`."""
    FAILED = "failed"
    """A judge mean is below `minScore`: the job gets the QualityGateFailed condition."""
    SKIPPED = "skipped"
    """No gate: `minScore` is not set (or evaluation did not judge)."""
    UNKNOWN = "unknown"
    """`minScore` is set but the judge gave no usable scores (endpoint unreachable, answers malformed)."""


class JudgeStatus(StrEnum):
    SCORED = "scored"
    UNKNOWN = "unknown"


METRIC_MODEL_SOURCE_MESSAGE: Final = "a metric model needs exactly one of id, uri or tiny: true"
"""The rule's message (the CRD's CEL rule, `job.TRAINER_RULES`, says the same)."""


class MetricModelSpec(Model):
    """A metric model (DINO or CLIP, transformers format). Exactly one of id, uri or tiny."""

    id: str | None = Field(default=None, max_length=256, pattern=HUB_ID_PATTERN)
    """A model id on the Hugging Face Hub, for example facebook/dino-vits16."""
    revision: str = Field(default="main", max_length=128)
    """The hub revision (branch, tag or commit) of `id`; pin a commit to compare scores across months."""
    uri: Uri | None = None
    """A transformers model folder in object storage (config.json, weights, preprocessor config), instead of id."""
    tiny: Bool = False
    """A tiny random model built from configs: demos and tests only (the scores mean nothing)."""

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        sources = [s for s in (self.id, self.uri) if s] + (["tiny"] if self.tiny else [])
        if len(sources) != 1:
            raise ValueError(METRIC_MODEL_SOURCE_MESSAGE)
        return self

    def identity(self) -> str:
        """A readable name of the weights, recorded with the scores (scores from different models differ)."""
        if self.tiny:
            return "tiny"
        if self.id:
            return f"hub:{self.id}@{self.revision}"
        return f"uri:{self.uri}"


PromptTemplate = Annotated[str, Field(min_length=3, max_length=1000, pattern=r"\{\}")]


class EvaluationSpec(Model):
    """After training, sample prompts from the trained model and score the samples against the subject's images."""

    enabled: Bool = False
    """Run the evaluation after training."""
    subject_kind: SubjectKind = SubjectKind.OBJECT
    """Which of DreamBench's prompt lists to use: object (backgrounds and properties) or live (also outfits)."""
    prompts: list[PromptTemplate] | None = Field(default=None, min_length=1, max_length=100)
    """Your own prompt templates instead of DreamBench's; `{}` marks the subject, for example "a {} on a boat"."""
    images_per_prompt: Int = Field(default=1, ge=1, le=16)
    """Samples per prompt (the paper uses 4; 1 keeps the GPU time per subject low)."""
    seed: Int = Field(default=0, ge=0, le=2**31 - 1)
    """Sample j of prompt i uses seed + i * imagesPerPrompt + j, for the trained and the base model alike."""
    num_inference_steps: Int = Field(default=30, ge=1, le=1000)
    """Sampling steps per image."""
    guidance_scale: Float = Field(default=7.5, ge=0.0, le=50.0)
    """Classifier-free guidance scale."""
    baseline: Bool = True
    """Also sample and score the base model with the same prompts and seeds, so the gain is visible."""
    dino_model: MetricModelSpec | None = None
    """The DINO model (subject fidelity); unset: facebook/dino-vits16, the paper's ViT-S/16."""
    clip_model: MetricModelSpec | None = None
    """The CLIP model (CLIP-I and CLIP-T); unset: openai/clip-vit-base-patch32, as in the published numbers."""
    subject: str | None = Field(default=None, min_length=1, max_length=200)
    """What the prompts call the subject, for example "sks stuffed animal"; unset: the instance prompt's identifier
    and the word after it ("sks dog" in "a photo of sks dog")."""
    reference_images: Uri | None = None
    """A prefix of held-out photos of the subject to compare against; the instance images when unset."""
    judge: Bool = False
    """Also have the VLM (`spec.vlm`) score each sample for concept preservation and prompt following (0-4)."""
    min_score: Float | None = Field(default=None, ge=0.0, le=4.0)
    """The quality gate: both judge means (0-4) must reach it, else the job gets QualityGateFailed. Needs judge."""

    @model_validator(mode="after")
    def _gate_needs_judge(self) -> Self:
        if self.min_score is not None and not self.judge:
            raise ValueError("evaluation.minScore needs evaluation.judge: true")
        return self

    def dino(self) -> MetricModelSpec:
        """The DINO model, the default when unset."""
        return self.dino_model or MetricModelSpec(id=DEFAULT_DINO_MODEL)

    def clip(self) -> MetricModelSpec:
        """The CLIP model, the default when unset."""
        return self.clip_model or MetricModelSpec(id=DEFAULT_CLIP_MODEL)

    def templates(self) -> list[str]:
        """The prompt templates: the user's, or DreamBench's for the subject kind."""
        if self.prompts:
            return list(self.prompts)
        return list(LIVE_PROMPTS if self.subject_kind is SubjectKind.LIVE else OBJECT_PROMPTS)


def fill_prompt(template: str, subject: str) -> str:
    """Put `subject` where the template's `{}` is (every occurrence; no other brace is interpreted)."""
    return " ".join(template.replace(SUBJECT_PLACEHOLDER, subject).split())


def subject_from_prompt(prompt: str, identifier: str) -> str:
    """The subject text of an instance prompt: the identifier and the word after it ("a photo of sks dog" ->
    "sks dog"); the identifier alone when it is the last word or not a word of the prompt."""
    words = [w.strip(".,;:!?\"'()") for w in prompt.split()]
    if identifier in words:
        i = words.index(identifier)
        if i + 1 < len(words) and words[i + 1]:
            return f"{identifier} {words[i + 1]}"
    return identifier


def split_subject(subject: str, identifier: str | None = None) -> tuple[str, str]:
    """The identifier and the class words of a subject text: ("sks", "dog") for "sks dog".

    The identifier is `identifier` when given, else the first word; the class text is the other words (empty when
    the subject text is the identifier alone).
    """
    words = subject.split()
    if not words:
        raise ValueError("the subject text is empty")
    ident = identifier or words[0]
    rest = [w for w in words if w != ident]
    return ident, " ".join(rest)


class SecretKeyRef(Model):
    """A key of a Secret in the job's namespace."""

    name: DnsSubdomain
    """The Secret's name."""
    key: str = Field(default="apiKey", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """The key that holds the value."""


class VlmSpec(Model):
    """An OpenAI-compatible chat-completions endpoint serving a vision-language model."""

    base_url: str = Field(min_length=8, max_length=1024, pattern=r"^https?://\S+$")
    """The API base URL including /v1, for example http://ernie-vl.models:8000/v1 (vLLM or FastDeploy)."""
    model: str = Field(min_length=1, max_length=256)
    """The served model name, for example baidu/ERNIE-4.5-VL-28B-A3B-PT or baidu/ernie-4.5-vl-424b-a47b."""
    credentials_secret: SecretKeyRef | None = None
    """The Secret key holding the API key (sent as a bearer token); none for an endpoint without authentication."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Provider-specific request fields merged into every request body, for example
    {"chat_template_kwargs": {"enable_thinking": false}} for ERNIE 4.5 VL on vLLM or FastDeploy."""
    timeout_seconds: Float = Field(default=120.0, gt=0.0, le=3600.0)
    """Timeout of one request."""
    max_retries: Int = Field(default=3, ge=0, le=10)
    """Retries of a request after a timeout, a connection error, 408, 409, 429 or 5xx, with exponential backoff
    (Retry-After is honoured up to 2 minutes)."""
    max_concurrency: Int = Field(default=4, ge=1, le=64)
    """Requests in flight at once."""
    structured_output: StructuredOutput = StructuredOutput.AUTO
    """auto, json_schema or prompt (see StructuredOutput)."""
    max_image_side: Int = Field(default=768, ge=64, le=4096)
    """Images are downscaled so that their longer side is at most this many pixels before they are sent."""
    temperature: Float | None = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature (0: as repeatable as the server allows); null leaves it to the server."""
    max_tokens: Int | None = Field(default=None, ge=1, le=131072)
    """The answer's token limit; null leaves it to the server (a thinking model needs room for its reasoning)."""


class CaptionsSpec(Model):
    """How the VLM captions instance images (`instanceImages.captions: auto`)."""

    overwrite: Bool = False
    """Replace existing .txt sidecars (otherwise an image that has one keeps it)."""
    max_words: Int = Field(default=40, ge=5, le=70)
    """Longest caption in words (CLIP's text encoder reads 77 tokens)."""
    instruction: str | None = Field(default=None, max_length=2000)
    """Extra guidance added to the captioning request, for example "mention the clothing"."""


# Results. They are read by the operator and the CLI, possibly of another version than the trainer that wrote
# them, so unknown fields are ignored (ApiModel), unlike the config models.


class MetricScores(ApiModel):
    """The DreamBooth paper's metrics over a set of samples (cosine similarities, -1 to 1)."""

    dino: float | None = None
    """Mean DINO cosine between every sample and every reference image (subject fidelity)."""
    clip_i: float | None = None
    """Mean CLIP image cosine between every sample and every reference image (subject fidelity)."""
    clip_t: float | None = None
    """Mean CLIP cosine between each sample and its prompt, the subject named by its class (prompt fidelity)."""


class SampleJudgement(ApiModel):
    """The judge's scores of one sample (null with a reason when unknown)."""

    image: str
    """The sample's path, relative to the evaluation's output folder."""
    concept_preservation: int | None = Field(default=None, ge=0, le=4)
    """How well the sample shows the reference subject (0: not at all, 4: the same subject)."""
    concept_reason: str | None = None
    """The judge's short reason, or why the score is unknown."""
    prompt_following: int | None = Field(default=None, ge=0, le=4)
    """How well the sample follows the prompt (0: not at all, 4: fully)."""
    prompt_reason: str | None = None
    """The judge's short reason, or why the score is unknown."""


class JudgeScores(ApiModel):
    """The judge's means over all samples."""

    status: JudgeStatus
    """scored, or unknown (then `reason` says why)."""
    concept_preservation: float | None = None
    """Mean concept-preservation score (0-4) over the samples that were scored."""
    prompt_following: float | None = None
    """Mean prompt-following score (0-4) over the samples that were scored."""
    samples: int = 0
    """Samples sent to the judge."""
    scored: int = 0
    """Samples that got both scores."""
    reason: str | None = None
    """Why the judge's result is unknown (or why some samples were not scored)."""


class PromptDetail(ApiModel):
    """One prompt's samples and scores."""

    template: str
    """The prompt template."""
    prompt: str
    """The prompt the samples were generated from (with the identifier)."""
    text_prompt: str
    """The prompt CLIP-T and the judge compare the samples with (the subject named by its class)."""
    seeds: list[int]
    """The seed of each sample."""
    images: list[str]
    """The trained model's samples, relative to the output folder."""
    base_images: list[str] = Field(default_factory=list)
    """The base model's samples, relative to the output folder."""
    trained: MetricScores
    """Metrics of the trained model's samples of this prompt."""
    base: MetricScores | None = None
    """Metrics of the base model's samples of this prompt."""
    judgements: list[SampleJudgement] = Field(default_factory=list)
    """The judge's scores of the trained model's samples."""


class EvaluationResult(ApiModel):
    """What one evaluation produced (`evaluation-result.json` in the evaluation's output folder)."""

    trained: MetricScores
    """Metrics of the trained model."""
    base: MetricScores | None = None
    """Metrics of the base model (same prompts and seeds), when baseline is on."""
    judge: JudgeScores | None = None
    """The judge's scores, when judge is on."""
    quality_gate: QualityGate = QualityGate.SKIPPED
    """passed, failed, skipped or unknown."""
    quality_gate_reason: str = ""
    """Why the gate decided as it did."""
    min_score: float | None = None
    """The gate's threshold."""
    prompts: list[PromptDetail] = Field(default_factory=list)
    """Per-prompt detail."""
    images_per_prompt: int = 1
    """Samples per prompt."""
    reference_images: int = 0
    """How many reference images the samples were compared with."""
    dino_model: str = ""
    """The DINO model's identity."""
    clip_model: str = ""
    """The CLIP model's identity."""
    grid: str | None = None
    """The image grid (rows: prompts; columns: trained samples, then base samples), relative to the folder."""
    seconds: float = 0.0
    """Wall time of the evaluation."""

    def scores(self) -> dict[str, float]:
        """The flat name -> number map of `status.outputs.evaluation` and `evaluation.json` (unknown ones left
        out): dino, clipI, clipT, baseDino, baseClipI, baseClipT, conceptPreservation, promptFollowing."""
        out: dict[str, float] = {}
        for prefix, scores in (("", self.trained), ("base", self.base)):
            if scores is None:
                continue
            for name, value in (("dino", scores.dino), ("clipI", scores.clip_i), ("clipT", scores.clip_t)):
                if value is not None:
                    out[prefix + name[0].upper() + name[1:] if prefix else name] = value
        if self.judge is not None and self.judge.status is JudgeStatus.SCORED:
            if self.judge.concept_preservation is not None:
                out["conceptPreservation"] = self.judge.concept_preservation
            if self.judge.prompt_following is not None:
                out["promptFollowing"] = self.judge.prompt_following
        return out

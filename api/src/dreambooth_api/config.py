"""The trainer's configuration: the single source of truth for what training means.

`TrainingConfig` is `spec.training` of a DreamBoothJob; the CRD schema for it is generated from this
model. `JobConfig` is the whole input of one training run, which the operator writes into a ConfigMap
and passes through the `env.CONFIG` environment variable (a JSON document or a file path).

Field names are camelCase on the wire (as Kubernetes APIs are) and snake_case in Python.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from dreambooth_api import env, yamlio
from dreambooth_api.common import Bool, CamelModel, Float, Int, Uri
from dreambooth_api.evaluation import CaptionMode, EvaluationSpec, VlmSpec, caption_mode


class Model(CamelModel):
    """Base of every config model: as the API models (`CamelModel`), but unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")


class Method(StrEnum):
    FULL = "full"
    LORA = "lora"


class MixedPrecision(StrEnum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"


class LRSchedule(StrEnum):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    LINEAR = "linear"
    COSINE = "cosine"


class Sampler(StrEnum):
    """Sampling schedulers: for class images, validation samples, and the sampling server (`defaultScheduler`)."""

    DDIM = "ddim"
    EULER = "euler"
    EULER_ANCESTRAL = "euler_ancestral"
    DPM_SOLVER = "dpm_solver"
    PNDM = "pndm"


class Crop(StrEnum):
    CENTER = "center"
    RANDOM = "random"


class ExportFormat(StrEnum):
    DIFFUSERS = "diffusers"
    SAFETENSORS = "safetensors"
    LORA = "lora"


class ExportDType(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class BaseModelSpec(Model):
    """Where the Stable Diffusion base model comes from. Exactly one of id, uri, or tiny."""

    id: str | None = Field(default=None, max_length=256, pattern=r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")
    """A model id on the Hugging Face Hub, for example stable-diffusion-v1-5/stable-diffusion-v1-5."""
    revision: str = Field(default="main", max_length=128)
    """The hub revision (branch, tag or commit) of `id`."""
    uri: Uri | None = None
    """A diffusers folder in object storage (s3:// or file://), used instead of `id`."""
    tiny: Bool = False
    """Build a tiny Stable Diffusion model from configs (random UNet and text encoder, hand-set VAE): demos, tests."""
    variant: str | None = Field(default=None, max_length=32)
    """The weights variant to load, for example fp16."""

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        sources = [s for s in (self.id, self.uri) if s] + (["tiny"] if self.tiny else [])
        if len(sources) != 1:
            raise ValueError("baseModel needs exactly one of id, uri or tiny: true")
        return self

    def cache_identity(self, resolved: str | None = None) -> str:
        """A stable identity of the weights, used in content-addressed cache keys.

        `resolved` is what the base model resolved to when it was fetched: the hub commit of `revision`, or a
        digest of the uri folder's listing (see `components.resolve_model`). Without it the identity is only the
        name (`revision` may be a branch that moves, a uri may be overwritten).
        """
        if self.tiny:
            return "tiny"
        if self.id:
            return f"hub:{self.id}@{resolved or self.revision}"
        return f"uri:{self.uri}" + (f"#{resolved}" if resolved else "")


class InstanceImagesSpec(Model):
    """The subject's photos and the prompt that names it."""

    uri: Uri | None = None
    """An object-storage prefix that holds the images (jpg, jpeg, png, webp)."""
    files: list[Uri] | None = Field(default=None, max_length=1000)
    """An explicit list of image URIs, used instead of `uri`."""
    prompt: str = Field(min_length=1, max_length=1000)
    """The instance prompt with the identifier token, for example "a photo of sks dog"."""
    identifier: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^\S+$")
    """The identifier token that names the subject, for example sks; it must appear in `prompt`. When null it is
    the words of `prompt` that the class prompt lacks. Sidecar captions must contain it."""
    captions: Annotated[CaptionMode, BeforeValidator(caption_mode)] = CaptionMode.OFF
    """Where each image's caption comes from: off (the prompt), sidecar (a .txt file next to each image, written by
    you; it must contain the identifier token) or auto (the VLM, spec.vlm, writes the .txt sidecars before training).
    A trainer config file may also say true (sidecar) or false (off)."""
    overwrite_captions: Bool = False
    """With captions: auto, caption every image again (otherwise an image with a .txt sidecar keeps it). A resumed
    run keeps the captions its earlier attempt trained on (recorded in the output's captions.json)."""
    min_images: Int = Field(default=1, ge=1, le=1000)
    """Fail the job when fewer images than this are found."""
    min_resolution: Int = Field(default=64, ge=8, le=8192)
    """Fail the job when an image's shorter side is below this many pixels."""
    crop: Crop = Crop.CENTER
    """How to crop images to the training resolution after resizing the shorter side."""
    flip: Bool = False
    """Randomly flip images horizontally."""

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.uri is None) == (self.files is None):
            raise ValueError("instanceImages needs exactly one of uri or files")
        if self.identifier is not None and self.identifier not in self.prompt.split():
            raise ValueError(f"instanceImages.identifier {self.identifier!r} must be a word of instanceImages.prompt")
        return self


class PriorPreservationSpec(Model):
    """Prior preservation: generated class images keep the model from forgetting the class."""

    enabled: Bool = False
    """Turn prior preservation on."""
    class_prompt: str | None = Field(default=None, min_length=1, max_length=1000)
    """The class prompt without the identifier, for example "a photo of a dog". Required when enabled."""
    num_images: Int = Field(default=100, ge=1, le=10000)
    """How many class images to generate (or reuse from the cache)."""
    loss_weight: Float = Field(default=1.0, ge=0.0, le=100.0)
    """The weight of the prior loss: loss = instance loss + lossWeight * prior loss."""
    cache_uri: Uri | None = Field(default=None)
    """The shared, content-addressed class-image cache. Defaults to <output uri>/../class-cache."""
    sampler: Sampler = Sampler.DDIM
    """The sampler used to generate class images."""
    steps: Int = Field(default=30, ge=1, le=1000)
    """Sampling steps per class image."""
    guidance_scale: Float = Field(default=7.5, ge=0.0, le=50.0)
    """Classifier-free guidance scale for class images."""
    seed: Int = Field(default=0, ge=0, le=2**31 - 1)
    """Seed for class image generation."""

    @model_validator(mode="after")
    def _class_prompt(self) -> Self:
        if self.enabled and not self.class_prompt:
            raise ValueError("priorPreservation.classPrompt is required when prior preservation is enabled")
        return self


class LoraSpec(Model):
    """LoRA adapter settings (only with method: lora)."""

    rank: Int = Field(default=8, ge=1, le=512)
    """The rank of the LoRA update matrices."""
    alpha: Float = Field(default=8.0, gt=0.0, le=1024.0)
    """The LoRA scaling alpha (the update is scaled by alpha / rank)."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        max_length=64,
    )
    """Names of the UNet modules that get LoRA adapters."""
    dropout: Float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA path."""


class ValidationSpec(Model):
    """Periodic sampling of validation prompts during training."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(default_factory=list, max_length=32)
    """Prompts to sample with a fixed seed. Empty turns validation off."""
    interval_steps: Int = Field(default=100, ge=1)
    """Sample every this many steps (and at the end)."""
    before_training: Bool = Field(default=False)
    """Also sample once before the first step of a fresh run (step 0): the base model's baseline in the report."""
    num_images: Int = Field(default=1, ge=1, le=16)
    """Images per prompt."""
    steps: Int = Field(default=25, ge=1, le=1000)
    """Sampling steps."""
    guidance_scale: Float = Field(default=7.5, ge=0.0, le=50.0)
    """Classifier-free guidance scale."""
    seed: Int = Field(default=1234, ge=0, le=2**31 - 1)
    """The fixed seed, so that samples are comparable across steps."""


class CheckpointSpec(Model):
    """When to write checkpoints, and how many to keep."""

    interval_steps: Int | None = Field(default=100, ge=1)
    """Write a checkpoint every this many steps. Null turns step checkpoints off."""
    interval_seconds: Int | None = Field(default=600, ge=10)
    """Write a checkpoint when this many seconds have passed since the last one. Null turns it off."""
    keep: Int = Field(default=2, ge=1, le=100)
    """How many complete checkpoints to keep; older ones are deleted after a newer one is complete."""


class TrainingConfig(Model):
    """How to train: this is spec.training of a DreamBoothJob."""

    method: Method = Method.LORA
    """full fine-tunes the UNet (and optionally the text encoder); lora trains LoRA adapters."""
    lora: LoraSpec | None = None
    """LoRA settings; only allowed with method: lora (defaults apply when omitted)."""
    max_steps: Int = Field(default=400, ge=1, le=1_000_000)
    """Total optimizer steps."""
    learning_rate: Float = Field(default=1e-4, gt=0.0, le=1.0)
    """Peak learning rate of the UNet (or its adapters)."""
    lr_schedule: LRSchedule = Field(default=LRSchedule.CONSTANT)
    """The learning-rate schedule."""
    warmup_steps: Int = Field(default=0, ge=0)
    """Linear warmup steps (with lrSchedule constant: constant_with_warmup)."""
    batch_size: Int = Field(default=1, ge=1, le=256)
    """Instance images per GPU per step (the same number of class images is added with prior preservation)."""
    gradient_accumulation: Int = Field(default=1, ge=1, le=128)
    """Micro-batches accumulated per optimizer step."""
    resolution: Int = Field(default=512, ge=8, le=2048, multiple_of=8)
    """Training resolution in pixels (square); a multiple of 8."""
    train_text_encoder: Bool = Field(default=False)
    """Also train the text encoder."""
    text_encoder_steps: Int | None = Field(default=None, ge=1)
    """Train the text encoder for only this many steps (all steps when null)."""
    text_encoder_learning_rate: Float | None = Field(default=None, gt=0.0, le=1.0)
    """Learning rate of the text encoder (the UNet's when null)."""
    mixed_precision: MixedPrecision = Field(default=MixedPrecision.NO)
    """Mixed precision: no, fp16 or bf16 (fp16 and bf16 need a GPU)."""
    allow_tf32: Bool = Field(default=True)
    """On CUDA GPUs with tensor cores (Ampere and newer), run fp32 matmuls and convolutions in TF32: several times
    faster where a step still computes in fp32 (mixedPrecision: no, the frozen VAE and text encoder), at about 3
    significant digits. False keeps full fp32."""
    gradient_checkpointing: Bool = Field(default=False)
    """Trade compute for memory with activation checkpointing."""
    compile_unet: Bool = Field(default=False)
    """Run the UNet's training forward and backward through torch.compile (inductor). Faster steps on CUDA after a
    one-time compile of about a minute, which the compile cache on the shared model cache volume shortens for later
    jobs: worth it for long runs, rarely for a few hundred LoRA steps. Needs a C compiler in the image."""
    optimizer: Optimizer = Optimizer.ADAMW
    """adamw (fused on CUDA) or adamw8bit (bitsandbytes; 8-bit optimizer state, on CUDA or the CPU)."""
    adam_weight_decay: Float = Field(default=1e-2, ge=0.0, le=1.0)
    """AdamW weight decay."""
    max_grad_norm: Float | None = Field(default=1.0, gt=0.0)
    """Clip gradients to this norm (null: no clipping)."""
    max_non_finite_loss_steps: Int | None = Field(default=20, ge=1, le=1_000_000)
    """Stop a diverged run: once the loss was NaN or infinite for this many optimizer steps in a row, the trainer
    exits as failed for good (exit code 10, reason LossDiverged) instead of burning GPU time; checkpoints are not
    written while the loss is not finite. Null never stops."""
    seed: Int = Field(default=42, ge=0, le=2**31 - 1)
    """The training seed; the same seed and data give the same run."""
    snr_gamma: Float | None = Field(default=None, gt=0.0, le=100.0)
    """Min-SNR loss weighting gamma (5.0 is typical); null turns it off."""
    offset_noise: Float = Field(default=0.0, ge=0.0, le=1.0)
    """Offset-noise strength (0 turns it off)."""
    cache_latents: Bool = Field(default=True)
    """Encode images and prompts once when the VAE and text encoder are frozen."""
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    """Periodic validation samples."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """Checkpoint cadence and retention."""

    @model_validator(mode="after")
    def _lora_only_with_lora(self) -> Self:
        if self.lora is not None and self.method is not Method.LORA:
            raise ValueError("training.lora is only allowed with method: lora")
        return self

    def lora_or_default(self) -> LoraSpec:
        return self.lora or LoraSpec()


class OutputSpec(Model):
    """Where the trained model goes, and in which formats."""

    uri: Uri
    """The object-storage prefix that receives the model, samples, checkpoints and result.json."""
    formats: list[ExportFormat] = Field(default_factory=lambda: [ExportFormat.DIFFUSERS], min_length=1, max_length=3)
    """Export formats: diffusers (folder), safetensors (single file), lora (LoRA weights; method: lora only)."""
    dtype: ExportDType = ExportDType.FP16
    """The dtype of exported weights."""
    checkpoint_uri: Uri | None = Field(default=None)
    """Where checkpoints go. Defaults to <uri>/checkpoints. Required for multi-node jobs."""

    def resolved_checkpoint_uri(self) -> str:
        return self.checkpoint_uri or f"{self.uri.rstrip('/')}/checkpoints"


class StorageSettings(Model):
    """How to reach object storage. Credentials come from the environment, never from here."""

    endpoint: str | None = Field(default=None, max_length=512)
    """S3 endpoint URL (for S3-compatible servers); AWS when null."""
    region: str | None = Field(default=None, max_length=64)
    """S3 region."""
    addressing_style: str = Field(default="auto", pattern=r"^(auto|path|virtual)$")
    """S3 addressing style: auto, path or virtual."""


class JobConfig(Model):
    """The whole input of one training run (what the operator passes in `env.CONFIG`)."""

    name: str = Field(default="local", max_length=253)
    """The job's name (used for metric labels and logs)."""
    namespace: str = Field(default="default", max_length=63)
    """The job's namespace (used for metric labels)."""
    base_model: BaseModelSpec = Field(default_factory=lambda: BaseModelSpec(tiny=True))
    """The base model."""
    instance_images: InstanceImagesSpec = Field(alias="instanceImages")
    """The instance images and prompt."""
    prior_preservation: PriorPreservationSpec = Field(default_factory=PriorPreservationSpec)
    """Prior preservation."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Training hyper-parameters."""
    output: OutputSpec
    """Outputs."""
    storage: StorageSettings = Field(default_factory=StorageSettings)
    """Object-storage connection settings."""
    evaluation: EvaluationSpec | None = None
    """Evaluation after training (docs/evaluation.md)."""
    vlm: VlmSpec | None = None
    """The vision-language model for captions: auto and the evaluation's judge."""

    @model_validator(mode="after")
    def _lora_export(self) -> Self:
        if not lora_export_allowed(self.output.formats, self.training.method):
            raise ValueError(LORA_EXPORT_MESSAGE)
        return self

    @model_validator(mode="after")
    def _vlm_needed(self) -> Self:
        judge = self.evaluation is not None and self.evaluation.judge
        if self.vlm is None and (messages := vlm_missing(judge, self.instance_images.captions)):
            raise ValueError("; ".join(messages))
        return self


LORA_EXPORT_MESSAGE = "output.formats may contain lora only with training.method: lora"
"""The rule's message; the CRD's CEL rule (`job.SPEC_RULES`) and the operator's twin say the same, and
tests/unit/test_api_rules.py checks all three against `lora_export_allowed` on the same cases."""


def lora_export_allowed(formats: Collection[str], method: str) -> bool:
    """The one definition of the rule: the lora export format needs method lora (enum members or their values)."""
    return ExportFormat.LORA not in formats or method == Method.LORA


JUDGE_NEEDS_VLM = "evaluation.judge needs spec.vlm"
CAPTIONS_NEED_VLM = "instanceImages.captions: auto needs spec.vlm"


def vlm_missing(judge: bool, captions: str) -> list[str]:
    """Why a job without `vlm` is invalid (the CRD's CEL rules say the same); empty when it is not."""
    return [m for m, needed in ((JUDGE_NEEDS_VLM, judge), (CAPTIONS_NEED_VLM, captions == CaptionMode.AUTO)) if needed]


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending field."""


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return "invalid config: " + "; ".join(parts)


def parse_job_config(data: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from err


def _names_a_file(value: str) -> bool:
    """Whether `env.CONFIG` is a path rather than an inline document (one line, an existing file)."""
    if "\n" in value or value.startswith(("{", "-", "#")):
        return False
    try:
        return Path(value).is_file()
    except OSError:  # e.g. a one-line YAML document longer than a file name may be
        return False


def _parse(text: str) -> Any:
    """JSON when it parses as JSON, else YAML (a YAML flow mapping such as `{a: 1}` also starts with a brace)."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return yamlio.safe_load(text)


def load_job_config(source: str | Path | None = None) -> JobConfig:
    """Load a JobConfig from a JSON/YAML file, or from `env.CONFIG` (inline JSON/YAML or a file path)."""
    text: str
    if source is None:
        raw = os.environ.get(env.CONFIG)
        if not raw:
            raise ConfigError(f"no config: pass a file or set {env.CONFIG}")
        stripped = raw.strip()
        text = Path(stripped).read_text() if _names_a_file(stripped) else raw
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
    try:
        data = _parse(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config is not valid JSON or YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping")
    return parse_job_config(data)

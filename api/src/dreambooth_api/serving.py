"""The sampling server's contract: its config document, its limits, its adapters and its samplers.

`ServerLimits` and `Adapter` are at once the InferenceService's `spec.server` and `spec.adapters[]` (the CRD schema
is generated from them, `dreambooth_api.inference`) and parts of `ServeConfig`, the JSON document the operator
passes to `dreambooth-serve` in `env.SERVE_CONFIG`. The samplers are the trainer config's `Sampler` (class images
and validation samples use the same ones), so a scheduler name means the same on both sides of the wall.

Subjects (LoRA adapters chosen by a request's `model`) come from three places, looked up in this order:
`ServeConfig.adapters`, the subjects file (`ServeConfig.subjects_file`, re-read when it changes: `SubjectsFile`),
and `ServeConfig.adapter_prefix` (every `<prefix>/<name>/lora/` export, found on first use).
"""

from __future__ import annotations

from typing import Final, Self

from pydantic import ConfigDict, Field, RootModel, model_validator

from dreambooth_api.common import ApiModel, DnsLabel, Float, Int, Uri, cel, validations
from dreambooth_api.config import BaseModelSpec, Model, Sampler, StorageSettings

__all__ = [
    "DEFAULT_MODEL_NAME",
    "Adapter",
    "Sampler",
    "ServeConfig",
    "ServerDefaults",
    "ServerLimits",
    "SubjectsFile",
]

DEFAULT_STEPS_MESSAGE = "server.defaultSteps may not exceed server.maxSteps"
DEFAULT_MODEL_NAME: Final = "base"
"""The base model's name in `GET /v1/models` and a request's `model` when `ServeConfig.model_name` is unset."""


class Adapter(ApiModel):
    """A LoRA adapter loaded on top of the model; requests choose adapters by name."""

    name: DnsLabel
    """The adapter's name, unique in the list."""
    uri: Uri
    """The LoRA weights folder (a DreamBoothJob's <output>/lora)."""
    weight: Float = Field(default=1.0, ge=-10.0, le=10.0)
    """The default scale of the adapter."""


class ServerLimits(ApiModel):
    """Limits and defaults of the sampling server; requests beyond a limit are rejected with HTTP 400."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.defaultSteps) || !has(self.maxSteps) || self.defaultSteps <= self.maxSteps",
                DEFAULT_STEPS_MESSAGE,
            ),
        )
    )

    max_batch_size: Int = Field(default=4, ge=1, le=64)
    """The most images generated together in one pipeline call. Concurrent compatible requests (same size, steps,
    scheduler, guidance scale and adapters) are batched up to this many images; a request asking for more runs
    alone, its images generated in chunks of this size. 1 turns batching off."""
    max_batch_delay_ms: Int | None = Field(default=None, ge=0, le=10_000)
    """How long the first request of a batch may wait for compatible requests to join it (10 when unset)."""
    max_queued_requests: Int | None = Field(default=None, ge=1, le=10_000)
    """Requests waiting for the model, at most; more get HTTP 429 with Retry-After (64 when unset)."""
    request_timeout_seconds: Int | None = Field(default=None, ge=1, le=3600)
    """A request's deadline, queueing included; a request past it gets HTTP 503 and its work is dropped (120 when
    unset)."""
    max_prompt_tokens: Int | None = Field(default=None, ge=1, le=1024)
    """The longest prompt (and negative prompt) in tokenizer tokens, start and end tokens included (the text
    encoder's context, 77 for Stable Diffusion, when unset; longer prompts would be cut)."""
    max_loaded_adapters: Int | None = Field(default=None, ge=1, le=4096)
    """LoRA adapters kept loaded in the pipeline, at most; the least recently used is evicted (8 when unset)."""
    max_adapter_memory_mb: Int | None = Field(default=None, ge=1, le=1_048_576)
    """Memory of the loaded LoRA adapters' weights in mebibytes, at most (on the GPU, or host memory on the CPU);
    the least recently used are evicted (2048 when unset)."""
    max_images_per_request: Int = Field(default=4, ge=1, le=64)
    """The most images one request may ask for."""
    max_steps: Int = Field(default=50, ge=1, le=1000)
    """The most sampling steps one request may ask for."""
    max_resolution: Int = Field(default=768, ge=64, le=2048, multiple_of=8)
    """The largest width or height one request may ask for (a multiple of 8)."""
    default_scheduler: Sampler = Sampler.EULER
    """The sampler used when a request names none."""
    default_steps: Int = Field(default=25, ge=1, le=1000)
    """Sampling steps when a request names none."""
    default_guidance_scale: Float = Field(default=7.5, ge=0.0, le=50.0)
    """Classifier-free guidance scale when a request names none."""

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if self.default_steps > self.max_steps:
            raise ValueError(DEFAULT_STEPS_MESSAGE)
        return self


class ServeConfig(Model):
    """What the sampling server loads and how it limits requests (`env.SERVE_CONFIG`, built by the operator)."""

    model_uri: Uri | None = None
    """A diffusers folder, a single-file checkpoint, or LoRA weights (folder or file; then baseModel is needed)."""
    base_model: BaseModelSpec | None = None
    """The base model: served as is without modelUri, or under a LoRA-only modelUri."""
    model_name: DnsLabel | None = None
    """The base model's name in `GET /v1/models` and a request's `model` (`DEFAULT_MODEL_NAME` when unset)."""
    adapters: list[Adapter] = Field(default_factory=list, max_length=16)
    """LoRA adapters on top of the model: a request for the base model gets all of them at their weight unless it
    chooses (`adapters` in the body); each is also a subject a request may name as its `model`."""
    adapter_prefix: Uri | None = None
    """Every LoRA export under this prefix is a subject named after its folder: `<prefix>/<name>/lora/` (a
    DreamBoothJob's `output.uri` below the prefix, named after the job). Found on first use, no restart needed."""
    subjects_file: str | None = Field(default=None, max_length=4096)
    """A local JSON file of subjects (`SubjectsFile`: name -> LoRA URI), re-read when it changes."""
    server: ServerLimits = Field(default_factory=ServerLimits)
    """Limits and request defaults."""
    storage: StorageSettings = Field(default_factory=StorageSettings)
    """Object-storage connection settings."""


class ServerDefaults:
    """What the server uses for the optional `ServerLimits` fields left unset."""

    MAX_BATCH_DELAY_MS: Final = 10
    MAX_QUEUED_REQUESTS: Final = 64
    REQUEST_TIMEOUT_SECONDS: Final = 120
    MAX_LOADED_ADAPTERS: Final = 8
    MAX_ADAPTER_MEMORY_MB: Final = 2048


class SubjectsFile(RootModel[dict[str, str]]):
    """The subjects file (`ServeConfig.subjects_file`, for example a mounted ConfigMap key): a JSON object of
    subject name (a DNS label) -> LoRA weights URI (a `<output>/lora` folder or its `.safetensors` file).

        {"dog": "s3://bucket/models/dog/lora", "cat": "s3://bucket/models/cat/lora/pytorch_lora_weights.safetensors"}

    The server re-reads it whenever it changes (a new subject is servable within a second of the file's update,
    without a restart); entries that are not a DNS label name or a URI are skipped with a warning, and a file that
    does not parse keeps the previous subjects."""

    root: dict[str, str] = Field(default_factory=dict)

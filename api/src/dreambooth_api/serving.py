"""The sampling server's contract: its config document, its limits, its adapters and its samplers.

`ServerLimits` and `Adapter` are at once the InferenceService's `spec.server` and `spec.adapters[]` (the CRD schema
is generated from them, `dreambooth_api.inference`) and parts of `ServeConfig`, the JSON document the operator
passes to `dreambooth-serve` in `env.SERVE_CONFIG`. The samplers are the trainer config's `Sampler` (class images
and validation samples use the same ones), so a scheduler name means the same on both sides of the wall.
"""

from __future__ import annotations

from typing import Self

from pydantic import ConfigDict, Field, model_validator

from dreambooth_api.common import ApiModel, DnsLabel, Uri, cel, validations
from dreambooth_api.config import BaseModelSpec, Model, Sampler, StorageSettings

__all__ = ["Adapter", "Sampler", "ServeConfig", "ServerLimits"]

DEFAULT_STEPS_MESSAGE = "server.defaultSteps may not exceed server.maxSteps"


class Adapter(ApiModel):
    """A LoRA adapter loaded on top of the model; requests choose adapters by name."""

    name: DnsLabel
    """The adapter's name, unique in the list."""
    uri: Uri
    """The LoRA weights folder (a DreamBoothJob's <output>/lora)."""
    weight: float = Field(default=1.0, ge=-10.0, le=10.0)
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

    max_batch_size: int = Field(default=4, ge=1, le=64)
    """Images generated together in one forward pass: a request's images are generated in chunks of this size
    (requests are not batched together; each replica answers one request at a time)."""
    max_images_per_request: int = Field(default=4, ge=1, le=64)
    """The most images one request may ask for."""
    max_steps: int = Field(default=50, ge=1, le=1000)
    """The most sampling steps one request may ask for."""
    max_resolution: int = Field(default=768, ge=64, le=2048, multiple_of=8)
    """The largest width or height one request may ask for (a multiple of 8)."""
    default_scheduler: Sampler = Sampler.EULER
    """The sampler used when a request names none."""
    default_steps: int = Field(default=25, ge=1, le=1000)
    """Sampling steps when a request names none."""
    default_guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
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
    adapters: list[Adapter] = Field(default_factory=list, max_length=16)
    """LoRA adapters loaded on top of the model (all active at their weight unless a request chooses)."""
    server: ServerLimits = Field(default_factory=ServerLimits)
    """Limits and request defaults."""
    storage: StorageSettings = Field(default_factory=StorageSettings)
    """Object-storage connection settings."""

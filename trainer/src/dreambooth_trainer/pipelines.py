"""A StableDiffusionPipeline from loaded parts, with the configured sampler (class priors, validation, serving)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dreambooth_api.config import Sampler


def make_scheduler(sampler: Sampler | str, scheduler_config: Any) -> Any:
    """A sampling scheduler of the given kind, built from the base model's (training) scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    classes = {
        Sampler.DDIM: DDIMScheduler,
        Sampler.EULER: EulerDiscreteScheduler,
        Sampler.EULER_ANCESTRAL: EulerAncestralDiscreteScheduler,
        Sampler.DPM_SOLVER: DPMSolverMultistepScheduler,
        Sampler.PNDM: PNDMScheduler,
    }
    kind = Sampler(sampler)
    if kind is Sampler.PNDM:
        # Stable Diffusion's PNDM settings; the Runge-Kutta warm-up steps fail for small step counts.
        return PNDMScheduler.from_config(scheduler_config, skip_prk_steps=True, set_alpha_to_one=False)
    return classes[kind].from_config(scheduler_config)


def build_pipeline(
    unet: Any,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    scheduler_config: Any,
    sampler: Sampler | str = Sampler.DDIM,
) -> Any:
    """A StableDiffusionPipeline sharing the given modules (no copies; no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(sampler, scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator_for(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded generator on the pipeline's device (CPU generators also work with CUDA pipelines)."""
    dev = torch.device(device)
    return torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(seed)


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast on the device's type when a dtype is given, else nothing (sampling in the weights' dtype)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)

"""Validation samples: the validation prompts, sampled with a fixed seed from the current weights.

Images go to `<output>/samples/step-XXXXXXXX/p<prompt>-i<image>.png` and, when a TensorBoard folder is given, to
TensorBoard as `validation/p<prompt>` images at that step. Rank 0 calls this between optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreambooth_api.config import JobConfig, Sampler, ValidationSpec
from dreambooth_trainer.imageio import encode_png
from dreambooth_trainer.pipelines import autocast, build_pipeline, generator_for
from dreambooth_trainer.storage import ObjectStore, join_uri


@dataclass
class ValidationResult:
    step: int
    images: list[list[Image.Image]] = field(default_factory=list)
    """images[prompt index][image index]."""
    uris: list[str] = field(default_factory=list)


def samples_uri(output_uri: str, step: int) -> str:
    return join_uri(output_uri, "samples", f"step-{step:08d}")


@torch.no_grad()
def sample_prompts(
    module: Any,
    spec: ValidationSpec,
    resolution: int,
    device: torch.device | str = "cpu",
    sampler: Sampler = Sampler.DDIM,
    autocast_dtype: torch.dtype | None = None,
) -> list[list[Image.Image]]:
    """Sample every prompt `spec.num_images` times; prompt i uses seed `spec.seed + i` (the same at every step)."""
    pipe = build_pipeline(
        module.unet, module.vae, module.text_encoder, module.tokenizer, module.noise_scheduler.config, sampler
    )
    modes = [(m, m.training) for m in (module.unet, module.vae, module.text_encoder)]
    for m, _ in modes:
        m.eval()
    dev = torch.device(device)
    out: list[list[Image.Image]] = []
    try:
        with autocast(dev, autocast_dtype):
            for i, prompt in enumerate(spec.prompts):
                images = pipe(
                    prompt,
                    height=resolution,
                    width=resolution,
                    num_inference_steps=spec.steps,
                    guidance_scale=spec.guidance_scale,
                    num_images_per_prompt=spec.num_images,
                    generator=generator_for(spec.seed + i, dev),
                ).images
                out.append(list(images))
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return out


def run_validation(
    module: Any,
    spec: ValidationSpec,
    step: int,
    resolution: int,
    store: ObjectStore,
    output_uri: str,
    tensorboard_dir: Path | None = None,
    device: torch.device | str = "cpu",
    sampler: Sampler = Sampler.DDIM,
    autocast_dtype: torch.dtype | None = None,
) -> ValidationResult:
    """Sample the validation prompts, write PNGs under the output's samples/ and to TensorBoard."""
    result = ValidationResult(step)
    if not spec.prompts:
        return result
    result.images = sample_prompts(module, spec, resolution, device, sampler, autocast_dtype)
    prefix = samples_uri(output_uri, step)
    for p, images in enumerate(result.images):
        for j, image in enumerate(images):
            uri = join_uri(prefix, f"p{p}-i{j}.png")
            store.write_bytes(uri, encode_png(image))
            result.uris.append(uri)
    if tensorboard_dir is not None:
        write_tensorboard(result, spec.prompts, Path(tensorboard_dir))
    return result


def write_tensorboard(result: ValidationResult, prompts: list[str], log_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer: Any = SummaryWriter(log_dir=str(log_dir))  # type: ignore[no-untyped-call]
    try:
        for p, images in enumerate(result.images):
            batch = np.stack([np.asarray(img, dtype=np.uint8) for img in images])
            writer.add_images(f"validation/p{p}", batch, result.step, dataformats="NHWC")
            writer.add_text(f"validation/p{p}/prompt", prompts[p], result.step)
        writer.flush()
    finally:
        writer.close()


def sample_and_upload(
    config: JobConfig, module: Any, store: ObjectStore, step: int, tensorboard_dir: Path | None = None
) -> list[str]:
    """The runtime's hook: sample `training.validation` at `step` on the module's device; returns the PNG URIs."""
    device = next(module.unet.parameters()).device
    result = run_validation(
        module,
        config.training.validation,
        step,
        config.training.resolution,
        store,
        config.output.uri,
        tensorboard_dir=tensorboard_dir,
        device=device,
        autocast_dtype=validation_autocast_dtype(module),
    )
    return result.uris


def validation_autocast_dtype(module: Any) -> torch.dtype | None:
    """The half dtype to sample under when any of the UNet, VAE or text encoder holds half-precision weights (mixed
    precision casts only the frozen ones: without autocast their outputs would meet fp32 weights), else None."""
    dtypes = {p.dtype for m in (module.unet, module.vae, module.text_encoder) for p in m.parameters()}
    for half in (torch.bfloat16, torch.float16):
        if half in dtypes:
            return half
    return None

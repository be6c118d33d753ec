"""From a JobConfig and the loaded base model to a ready training Dataset (instances, class priors, caches).

The runtime calls `prepare_dataset` on every rank after loading the components and before building the module:
class images are generated with the base weights (each rank its share, then `barrier()`), every rank loads the
same sets, and the latent and text caches are filled when the VAE and text encoder are frozen. The models move to the
device only on a rank that generates something; with mixed precision on CUDA generation runs under autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dreambooth_api.config import Crop, JobConfig, MixedPrecision
from dreambooth_trainer.components import Components
from dreambooth_trainer.data import CLASS, DreamBoothDataset, class_examples, load_instance_examples
from dreambooth_trainer.priors import class_latents, default_cache_root, generate_class_images, load_class_images
from dreambooth_trainer.storage import ObjectStore


def prepare_dataset(
    config: JobConfig,
    components: Components,
    store: ObjectStore,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    barrier: Callable[[], Any] | None = None,
    on_phase: Callable[[str], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DreamBoothDataset:
    """Load and validate instance images, generate/reuse class priors, and build the (cached) Dataset.

    `barrier` is called once after class-image generation (every rank must call this function). `on_phase`
    receives "GeneratingPriors" before generation starts (for /progress). `should_stop` (a preemption signal) ends
    class-image generation between batches with StoppedError.
    """
    t = config.training
    prior = config.prior_preservation
    instances = load_instance_examples(
        config.instance_images, store, t.resolution, class_prompt=prior.class_prompt if prior.enabled else None
    )
    classes = None
    preset: dict[tuple[int, int, bool], torch.Tensor] = {}
    if prior.enabled:
        if on_phase:
            on_phase("GeneratingPriors")
        moved: list[bool] = []
        result = generate_class_images(
            components,
            config.base_model,
            prior,
            t.resolution,
            store,
            default_cache_root(config),
            rank=rank,
            world_size=world_size,
            device=device,
            job=f"{config.namespace}/{config.name}",
            autocast_dtype=generation_dtype(t.mixed_precision, device),
            before_generating=lambda: moved.append(_to_device(components, device)),
            should_stop=should_stop,
        )
        if barrier is not None:
            barrier()
        loaded = load_class_images(store, result.uri, prior.num_images)
        assert prior.class_prompt is not None
        classes = class_examples([img for _, img in loaded], prior.class_prompt, t.resolution, [u for u, _ in loaded])
        if t.cache_latents and config.instance_images.crop is Crop.CENTER:
            vae = components.vae.to(device)  # back on the CPU below, with the dataset's caches
            latents = class_latents(
                store, result.uri, [c.image for c in classes], vae, t.resolution, device, write=rank == 0
            )
            preset = {(CLASS, i, False): p for i, p in latents.items()}
        if any(moved):
            _to_device(components, "cpu")
    dataset = DreamBoothDataset(
        instances,
        components.tokenizer,
        t.resolution,
        classes=classes,
        crop=config.instance_images.crop,
        flip=config.instance_images.flip,
        seed=t.seed,
    )
    if t.cache_latents:
        vae_dtype = next(components.vae.parameters()).dtype
        dataset.cache_latents(components.vae.to(device), device, vae_dtype, preset=preset)
        if not t.train_text_encoder:
            dataset.cache_text_embeddings(components.text_encoder.to(device), device)
        components.vae.to("cpu")
        components.text_encoder.to("cpu")
    return dataset


def generation_dtype(mixed_precision: MixedPrecision, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for class-image generation: bf16 where supported, else fp16, on CUDA with mixed precision."""
    if mixed_precision is MixedPrecision.NO or torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _to_device(components: Components, device: torch.device | str) -> bool:
    if torch.device(device).type == "cpu" and next(components.unet.parameters()).device.type == "cpu":
        return False
    for model in (components.unet, components.vae, components.text_encoder):
        model.to(device)
    return True

"""Class-prior images: a content-addressed cache in object storage, shared across jobs.

Layout (docs/contracts.md): `<cacheUri>/<key>/class-00000.png ...` with `latents-<res>.safetensors` beside, where
`key` hashes the base model's identity and revision, the class prompt, resolution, sampler, steps, guidance and seed.
The image count is not part of the key: a job that wants more images than the cache holds generates only the
missing indices, and a job that wants fewer uses the first ones.

Image `i` is generated from seed `seed + i`, so an image does not depend on which rank made it or in what batch.
Ranks split the missing indices (`i % world_size == rank`); the caller puts a barrier after `generate_class_images`
before every rank reads the set with `load_class_images`. Jobs that fill the same set at the same time share the
work: each walks its share from a job-specific start and direction and re-lists the set before every batch,
skipping what another job has written meanwhile (only a batch in flight when two jobs meet is generated twice).

The base model in the key is its resolved identity (`Components.identity`: the hub commit, or a digest of the uri
folder's listing). The precision of generation (autocast on CUDA with mixed precision) is not part of the key: it
changes pixels slightly, not what the images show.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from prometheus_client import Counter

from dreambooth_api.config import BaseModelSpec, JobConfig, PriorPreservationSpec
from dreambooth_api.exitcodes import InvalidInputError, StoppedError
from dreambooth_trainer.imageio import decode_image, encode_png
from dreambooth_trainer.pipelines import autocast, build_pipeline, generator_for
from dreambooth_trainer.storage import ObjectStore, join_uri

CLASS_IMAGES_GENERATED = Counter(
    "dreambooth_class_images_generated",
    "Class-prior images generated (cache misses); reused cached images are not counted.",
)
CLASS_IMAGES_REUSED = Counter(
    "dreambooth_class_images_reused",
    "Class-prior images found in the shared cache and reused.",
)
KEY_VERSION = 1
_IMAGE_RE = re.compile(r"class-(\d{5,})\.png$")


def class_cache_key(
    base: BaseModelSpec, prior: PriorPreservationSpec, resolution: int, model_identity: str | None = None
) -> str:
    """The content address of a class-image set (everything that changes the images except their count).

    `model_identity` is the resolved `Components.identity`; without it the base model counts by name only.
    """
    identity = {
        "v": KEY_VERSION,
        "model": model_identity or base.cache_identity(),
        "variant": base.variant,
        "classPrompt": prior.class_prompt,
        "resolution": resolution,
        "sampler": prior.sampler.value,
        "steps": prior.steps,
        "guidance": prior.guidance_scale,
        "seed": prior.seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def default_cache_root(config: JobConfig) -> str:
    """`priorPreservation.cacheUri`, or `<output uri>/../class-cache`."""
    if config.prior_preservation.cache_uri:
        return config.prior_preservation.cache_uri.rstrip("/")
    out = config.output.uri.rstrip("/")
    parent, _, _ = out.rpartition("/")
    if not parent or parent.endswith((":/", ":")):
        return join_uri(out, "class-cache")  # the output is a bucket root: keep the cache inside it
    return join_uri(parent, "class-cache")


def class_cache_uri(config: JobConfig, model_identity: str | None = None) -> str:
    key = class_cache_key(config.base_model, config.prior_preservation, config.training.resolution, model_identity)
    return join_uri(default_cache_root(config), key)


def image_uri(prefix: str, index: int) -> str:
    return join_uri(prefix, f"class-{index:05d}.png")


def latents_uri(prefix: str, resolution: int) -> str:
    return join_uri(prefix, f"latents-{resolution}.safetensors")


def existing_indices(store: ObjectStore, prefix: str) -> set[int]:
    found = set()
    for obj in store.list(prefix):
        match = _IMAGE_RE.search(obj.uri)
        if match and obj.size > 0:
            found.add(int(match.group(1)))
    return found


@dataclass
class PriorResult:
    uri: str
    """The cache folder of this class-image set."""
    generated: int
    """Images this rank generated (0 when the cache was complete)."""
    reused: int
    """Images that were already in the cache (counted on rank 0 only)."""


def share(missing: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's missing indices: `i % world_size == rank`."""
    return [i for i in missing if i % world_size == rank]


def walk_order(indices: list[int], job: str | None) -> list[int]:
    """`indices` in the order a job generates them: from a start and a direction hashed from `job` (a per-run nonce
    without one). Jobs at other starts meet late, and jobs walking towards each other stop when they meet."""
    if not indices:
        return []
    digest = hashlib.sha256(job.encode() if job else os.urandom(8)).digest()
    start = int.from_bytes(digest[:8], "big") % len(indices)
    rotated = indices[start:] + indices[:start]
    return rotated[:1] + rotated[:0:-1] if digest[8] & 1 else rotated


def next_batch(order: list[int], done: set[int], size: int) -> list[int]:
    """The next `size` indices of `order` that are not done (by this job or by another)."""
    return [i for i in order if i not in done][:size]


def _write_meta(
    store: ObjectStore, prefix: str, model: str, base: BaseModelSpec, prior: PriorPreservationSpec, res: int
) -> None:
    meta = {
        "model": model,
        "variant": base.variant,
        "classPrompt": prior.class_prompt,
        "resolution": res,
        "sampler": prior.sampler.value,
        "steps": prior.steps,
        "guidanceScale": prior.guidance_scale,
        "seed": prior.seed,
    }
    uri = join_uri(prefix, "meta.json")
    if not store.exists(uri):
        store.write_bytes(uri, json.dumps(meta, indent=2).encode())


@torch.no_grad()
def generate_class_images(
    components: Any,
    base: BaseModelSpec,
    prior: PriorPreservationSpec,
    resolution: int,
    store: ObjectStore,
    cache_root: str,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    *,
    job: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    before_generating: Callable[[], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PriorResult:
    """Generate this rank's share of the missing class images of the set; existing images are never regenerated.

    `components` has unet, vae, text_encoder, tokenizer, noise_scheduler (the base weights, before training) and
    `identity`. `job` names the job (see `walk_order`).
    `autocast_dtype` runs the pipeline under `torch.autocast` on `device`. `before_generating` is called once,
    before the first batch, and never when this rank has nothing to generate (to move the models to the device).
    `should_stop` is asked before every batch; when it says so (a preemption signal) StoppedError is raised, and
    the images written so far stay in the cache for the next attempt.
    """
    if not prior.class_prompt:
        raise InvalidInputError("priorPreservation.classPrompt is required to generate class images")
    model = getattr(components, "identity", "") or base.cache_identity()
    prefix = join_uri(cache_root, class_cache_key(base, prior, resolution, model))
    present = existing_indices(store, prefix)
    missing = [i for i in range(prior.num_images) if i not in present]
    reused = prior.num_images - len(missing)
    if rank == 0:
        CLASS_IMAGES_REUSED.inc(reused)
    order = walk_order(share(missing, rank, world_size), job)
    pipe = None
    done = set(present)
    generated = 0
    while chunk := next_batch(order, done, batch_size):
        if should_stop is not None and should_stop():
            raise StoppedError(
                f"stopped by a signal while generating class images ({generated} generated by this rank are cached)"
            )
        if pipe is None:
            if before_generating is not None:
                before_generating()
            _write_meta(store, prefix, model, base, prior, resolution)
            pipe = build_pipeline(
                components.unet,
                components.vae,
                components.text_encoder,
                components.tokenizer,
                components.noise_scheduler.config,
                prior.sampler,
            )
        with autocast(device, autocast_dtype):
            images = pipe(
                [prior.class_prompt] * len(chunk),
                height=resolution,
                width=resolution,
                num_inference_steps=prior.steps,
                guidance_scale=prior.guidance_scale,
                generator=[generator_for(prior.seed + i, device) for i in chunk],
            ).images
        for index, image in zip(chunk, images, strict=True):
            store.write_bytes(image_uri(prefix, index), encode_png(image))
            generated += 1
            CLASS_IMAGES_GENERATED.inc()
        done |= set(chunk) | existing_indices(store, prefix)  # what other jobs wrote meanwhile
    return PriorResult(prefix, generated, reused)


def load_class_images(store: ObjectStore, prefix: str, num_images: int) -> list[tuple[str, Image.Image]]:
    """The first `num_images` images of the set (after every rank generated its share)."""
    out = []
    for i in range(num_images):
        uri = image_uri(prefix, i)
        out.append((uri, decode_image(store.read_bytes(uri), uri)))
    return out


@torch.no_grad()
def class_latents(
    store: ObjectStore,
    prefix: str,
    images: list[Image.Image],
    vae: Any,
    resolution: int,
    device: torch.device | str = "cpu",
    write: bool = True,
    batch_size: int = 8,
) -> dict[int, torch.Tensor]:
    """VAE latent parameters (mean and log-variance) of the class images, read from the cache file beside them.

    Missing entries are encoded and, when `write` (rank 0), the file is rewritten with them. The images must
    already be `resolution` x `resolution` (center-cropped as the Dataset does).
    """
    from safetensors.torch import load, save

    from dreambooth_trainer.imageio import crop_box, to_tensor

    uri = latents_uri(prefix, resolution)
    cached: dict[str, torch.Tensor] = {}
    if store.exists(uri):
        cached = load(store.read_bytes(uri))
    todo = [i for i in range(len(images)) if f"class-{i:05d}" not in cached]

    dtype = next(vae.parameters()).dtype
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        pixels = torch.stack([to_tensor(images[i].crop(crop_box(images[i].size, resolution))) for i in chunk])
        params = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist.parameters.float().cpu()
        for i, p in zip(chunk, params, strict=True):
            cached[f"class-{i:05d}"] = p.contiguous().clone()
    if todo and write:
        store.write_bytes(uri, save(cached, metadata={"resolution": str(resolution)}))
    return {i: cached[f"class-{i:05d}"] for i in range(len(images))}

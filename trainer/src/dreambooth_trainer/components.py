"""Load the Stable Diffusion parts that training needs from a hub id, an object-storage folder, or the tiny model.

`load_components` returns the UNet, VAE, text encoder, tokenizer and noise scheduler, plus the local diffusers folder
they came from (export and sampling reuse its configs). A base model that is not there, or not a Stable Diffusion
diffusers folder, raises `InvalidInputError` naming it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_trainer.config import BaseModelSpec
from dreambooth_trainer.exitcodes import InvalidInputError, RetryableError
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore, join_uri
from dreambooth_trainer.tiny import build_tiny_pipeline

COMPLETE_MARKER = ".complete"
# The diffusers subfolders training reads (safety checker and feature extractor are never needed).
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline, loaded on CPU in fp32 (the caller moves and casts them)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    model_dir: Path


def resolve_model_dir(spec: BaseModelSpec, store: ObjectStore, cache_dir: Path) -> Path:
    """A local diffusers folder with the base model's files (downloaded or built once, then cached)."""
    cache_dir = Path(cache_dir)
    if spec.tiny:
        return build_tiny_pipeline(cache_dir / "tiny")
    if spec.uri:
        return _download_uri(spec.uri, store, cache_dir)
    assert spec.id is not None
    return _download_hub(spec, cache_dir)


def _download_uri(uri: str, store: ObjectStore, cache_dir: Path) -> Path:
    target = cache_dir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / COMPLETE_MARKER).is_file():
        return target
    if not store.exists(join_uri(uri, "model_index.json")):
        raise InvalidInputError(f"baseModel.uri {uri} is not a diffusers folder (no model_index.json)")
    wanted = [f"{uri.rstrip('/')}/{part}/" for part in REQUIRED_PARTS] + [join_uri(uri, "model_index.json")]
    try:
        for obj in store.list(uri):
            if any(obj.uri.startswith(w) or obj.uri == w for w in wanted):
                rel = obj.uri[len(uri.rstrip("/")) + 1 :]
                store.download_file(obj.uri, target / rel)
    except ObjectNotFoundError as err:
        raise InvalidInputError(f"baseModel.uri {uri}: {err}") from err
    (target / COMPLETE_MARKER).write_text(uri)
    return target


def _download_hub(spec: BaseModelSpec, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [f"{part}/*" for part in REQUIRED_PARTS] + ["model_index.json"]
    try:
        path = snapshot_download(
            repo_id=str(spec.id),
            revision=spec.revision,
            cache_dir=str(cache_dir / "hub"),
            allow_patterns=patterns,
            ignore_patterns=["*.ckpt", "*.bin"] if spec.variant is None else ["*.ckpt"],
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, EntryNotFoundError) as err:
        raise InvalidInputError(f"baseModel.id {spec.id}@{spec.revision} cannot be loaded: {err}") from err
    except (LocalEntryNotFoundError, OSError) as err:
        raise RetryableError(f"downloading baseModel.id {spec.id}@{spec.revision} failed: {err}") from err
    return Path(path)


def load_components_from_dir(model_dir: Path, variant: str | None = None, name: str | None = None) -> Components:
    """Load the training parts from a local diffusers folder; `name` is what errors call it (default: the path)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    label = name or str(model_dir)
    missing = [p for p in REQUIRED_PARTS if not (model_dir / p).is_dir()]
    if missing:
        raise InvalidInputError(f"base model {label} is not a Stable Diffusion diffusers folder: missing {missing}")
    try:
        return Components(
            unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", variant=variant),
            vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant=variant),
            text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", variant=variant),
            tokenizer=CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"),
            noise_scheduler=DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler"),
            model_dir=model_dir,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise InvalidInputError(f"base model {label} cannot be loaded: {err}") from err


def load_components(spec: BaseModelSpec, store: ObjectStore, cache_dir: Path) -> Components:
    """Resolve the base model to a local folder and load its parts (frozen, eval mode, fp32, on CPU)."""
    model_dir = resolve_model_dir(spec, store, cache_dir)
    label = spec.uri or (f"{spec.id}@{spec.revision}" if spec.id else "tiny")
    comps = load_components_from_dir(model_dir, variant=spec.variant, name=label)
    for model in (comps.unet, comps.vae, comps.text_encoder):
        model.requires_grad_(False)
        model.eval()
    return comps

"""Load the Stable Diffusion parts that training needs from a hub id, an object-storage folder, or the tiny model.

`load_components` returns the UNet, VAE, text encoder, tokenizer and noise scheduler, plus the local diffusers folder
they came from (export and sampling reuse its configs). A base model that is not there, or not a Stable Diffusion
diffusers folder, raises `InvalidInputError` naming it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_trainer.config import BaseModelSpec
from dreambooth_trainer.exitcodes import InvalidInputError, RetryableError
from dreambooth_trainer.model_files import REQUIRED_PARTS, hub_patterns, select_files
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore, join_uri
from dreambooth_trainer.tiny import build_tiny_pipeline

COMPLETE_MARKER = ".complete"
# Set by the operator when its model cache volume is configured: base models are kept there and shared by pods.
MODEL_CACHE_ENV = "DREAMBOOTH_MODEL_CACHE_DIR"
# A partial download folder this old was left by a pod that died mid-download (a live one keeps writing to it).
STALE_DOWNLOAD_SECONDS = 6 * 3600


def model_cache_dir(default: Path) -> Path:
    """Where base models are downloaded to: the shared cache when the pod has one, else `default`."""
    shared = os.environ.get(MODEL_CACHE_ENV)
    return Path(shared) / "models" if shared else Path(default)


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
        return _download_uri(spec.uri, spec.variant, store, cache_dir)
    assert spec.id is not None
    return _download_hub(spec, cache_dir)


def _download_uri(uri: str, variant: str | None, store: ObjectStore, cache_dir: Path) -> Path:
    key = hashlib.sha256(f"{uri}#{variant or ''}".encode()).hexdigest()[:16]
    target = cache_dir / "models" / key
    if (target / COMPLETE_MARKER).is_file():
        return target
    if not store.exists(join_uri(uri, "model_index.json")):
        raise InvalidInputError(f"baseModel.uri {uri} is not a diffusers folder (no model_index.json)")
    root = uri.rstrip("/")
    # Download beside the target and rename it into place, so that pods sharing the cache never see a half-copied
    # model: the first complete copy wins, a later one is discarded.
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_downloads(target.parent, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        listing = [obj.uri[len(root) + 1 :] for obj in store.list(uri)]
        for rel in select_files(listing, variant):
            store.download_file(f"{root}/{rel}", tmp / rel)
        (tmp / COMPLETE_MARKER).write_text(uri)
        if target.is_dir() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)  # left by an older, non-atomic download
        try:
            tmp.replace(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                raise
    except ObjectNotFoundError as err:
        raise InvalidInputError(f"baseModel.uri {uri}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sweep_stale_downloads(folder: Path, key: str) -> None:
    """Remove this model's partial download folders that nobody has written to for STALE_DOWNLOAD_SECONDS."""
    cutoff = time.time() - STALE_DOWNLOAD_SECONDS
    for partial in folder.glob(f".{key}-*"):
        try:
            newest = max([partial.stat().st_mtime] + [p.stat().st_mtime for p in partial.rglob("*")])
        except OSError:
            continue  # removed meanwhile by its owner
        if newest < cutoff:
            shutil.rmtree(partial, ignore_errors=True)


def _download_hub(spec: BaseModelSpec, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = snapshot_download(
            repo_id=str(spec.id),
            revision=spec.revision,
            cache_dir=str(cache_dir / "hub"),
            allow_patterns=hub_patterns(spec.variant),
        )
    except LocalEntryNotFoundError as err:
        # The hub is unreachable (or switched off) and the cache lacks this revision: worth a retry. It subclasses
        # EntryNotFoundError, so it must be caught first.
        raise RetryableError(f"downloading baseModel.id {spec.id}@{spec.revision} failed: {err}") from err
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, EntryNotFoundError) as err:
        raise InvalidInputError(f"baseModel.id {spec.id}@{spec.revision} cannot be loaded: {err}") from err
    except OSError as err:
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

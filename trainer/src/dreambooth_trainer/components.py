"""Load the Stable Diffusion parts that training needs from a hub id, an object-storage folder, or the tiny model.

`load_components` returns the UNet, VAE, text encoder, tokenizer and noise scheduler, plus the local diffusers folder
they came from (export and sampling reuse its configs) and the identity of the weights that were resolved: the hub
commit, or a digest of the object-storage folder's listing (ETags and sizes), so that caches keyed by it notice a
moved branch or an overwritten folder. A base model that is not there, or not a Stable Diffusion
diffusers folder, raises `InvalidInputError` naming it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_api import env
from dreambooth_api.config import BaseModelSpec
from dreambooth_api.exitcodes import InvalidInputError, RetryableError
from dreambooth_trainer.model_files import REQUIRED_PARTS, hub_allow_patterns, select_files
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore, relative_path
from dreambooth_trainer.tiny import build_tiny_pipeline

COMPLETE_MARKER = ".complete"
# A partial download folder this old was left by a pod that died mid-download (a live one keeps writing to it).
STALE_DOWNLOAD_SECONDS = 6 * 3600


def model_cache_dir(default: Path) -> Path:
    """Where base models are downloaded to: the shared cache when the pod has one (`env.MODEL_CACHE_DIR`, set by
    the operator when its model cache volume is configured: base models are shared by pods), else `default`."""
    shared = os.environ.get(env.MODEL_CACHE_DIR)
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
    identity: str = ""
    """`BaseModelSpec.cache_identity` of the resolved weights (empty when loaded from a folder by path)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A local diffusers folder and the identity of the weights in it."""

    path: Path
    identity: str


def resolve_model_dir(spec: BaseModelSpec, store: ObjectStore, cache_dir: Path) -> Path:
    """A local diffusers folder with the base model's files (downloaded or built once, then cached)."""
    return resolve_model(spec, store, cache_dir).path


def resolve_model(spec: BaseModelSpec, store: ObjectStore, cache_dir: Path) -> ResolvedModel:
    """The base model's local folder and its resolved identity (hub commit, or uri listing digest)."""
    cache_dir = Path(cache_dir)
    if spec.tiny:
        return ResolvedModel(build_tiny_pipeline(cache_dir / "tiny"), spec.cache_identity())
    if spec.uri:
        path, digest = _download_uri(spec.uri, spec.variant, store, cache_dir)
        return ResolvedModel(path, spec.cache_identity(digest))
    assert spec.id is not None
    path = _download_hub(spec, cache_dir)
    return ResolvedModel(path, spec.cache_identity(path.name))  # the snapshot folder is named by its commit


def listing_digest(objects: list[tuple[str, int, str]]) -> str:
    """A digest of (relative path, size, ETag) of the files a model is made of; changes when one is replaced."""
    lines = "\n".join(f"{rel}\t{size}\t{etag}" for rel, size, etag in sorted(objects))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _download_uri(uri: str, variant: str | None, store: ObjectStore, cache_dir: Path) -> tuple[Path, str]:
    """Download the training files of a diffusers folder once per content; returns (folder, listing digest)."""
    try:
        listed = {relative_path(uri, obj.uri): obj for obj in store.list(uri)}
    except ObjectNotFoundError as err:
        raise InvalidInputError(f"baseModel.uri {uri}: {err}") from err
    if "model_index.json" not in listed:
        raise InvalidInputError(f"baseModel.uri {uri} is not a diffusers folder (no model_index.json)")
    selected = select_files(listed, variant)
    digest = listing_digest([(rel, listed[rel].size, listed[rel].etag) for rel in selected])
    key = hashlib.sha256(f"{uri}#{variant or ''}#{digest}".encode()).hexdigest()[:16]
    target = cache_dir / "models" / key
    if (target / COMPLETE_MARKER).is_file():
        return target, digest
    try:
        download_folder({rel: listed[rel].uri for rel in selected}, store, target, what=f"baseModel.uri {uri}")
    except ObjectNotFoundError as err:
        raise InvalidInputError(f"baseModel.uri {uri}: {err}") from err
    return target, digest


def download_folder(files: Mapping[str, str], store: ObjectStore, target: Path, *, what: str) -> Path:
    """Download `files` (relative path -> object URI) into `target` once, atomically; returns `target`.

    The files land in a folder beside the target that is renamed into place with COMPLETE_MARKER inside, so that
    pods sharing the cache never see a half-copied model: the first complete copy wins, a later one is discarded.
    A key that would escape the folder (`../`) is InvalidInputError naming `what`.
    """
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    key = target.name
    _sweep_stale_downloads(target.parent, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        for rel, obj_uri in files.items():
            dest = (tmp / rel).resolve()
            if not dest.is_relative_to(tmp.resolve()):
                raise InvalidInputError(f"{what}: object key escapes the folder: {obj_uri}")
            store.download_file(obj_uri, dest)
        (tmp / COMPLETE_MARKER).write_text(what)
        if target.is_dir() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)  # left by an older, non-atomic download
        try:
            tmp.replace(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():  # another pod finished first: use theirs
                raise
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
            revision=spec.revision,  # not the listed commit: a branch must stay resolvable offline (refs/<branch>)
            cache_dir=str(cache_dir / "hub"),
            allow_patterns=hub_allow_patterns(_hub_listing(spec), spec.variant),
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


def _hub_listing(spec: BaseModelSpec) -> list[str] | None:
    """The repository's files at `spec.revision`; None when the hub cannot be reached (`snapshot_download` then
    reads the local cache). A missing repository or revision raises."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        info = HfApi().model_info(str(spec.id), revision=spec.revision)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError):
        raise
    except OSError:  # connection errors, timeouts, 5xx (requests' errors are OSErrors)
        return None
    return [s.rfilename for s in info.siblings or []]


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
    resolved = resolve_model(spec, store, cache_dir)
    label = spec.uri or (f"{spec.id}@{spec.revision}" if spec.id else "tiny")
    comps = load_components_from_dir(resolved.path, variant=spec.variant, name=label)
    comps.identity = resolved.identity
    for model in (comps.unet, comps.vae, comps.text_encoder):
        model.requires_grad_(False)
        model.eval()
    return comps

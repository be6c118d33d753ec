"""Loading the base model's parts: tiny, from an object-storage folder, from the Hugging Face cache, and the errors
for a wrong path."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dreambooth_api.config import BaseModelSpec
from dreambooth_api.exitcodes import InvalidInputError, RetryableError
from dreambooth_trainer.components import load_components
from dreambooth_trainer.model_files import select_files
from dreambooth_trainer.storage import ObjectStore
from dreambooth_trainer.tiny import build_tiny_pipeline


def test_tiny_components_are_frozen(tmp_path: Path) -> None:
    comps = load_components(BaseModelSpec(tiny=True), ObjectStore(), tmp_path)
    assert (comps.model_dir / "model_index.json").is_file()
    assert not any(p.requires_grad for p in comps.unet.parameters())
    assert comps.noise_scheduler.config.num_train_timesteps == 1000
    ids = comps.tokenizer("a photo of sks dog", return_tensors="pt").input_ids
    assert comps.text_encoder(ids)[0].shape[-1] == comps.unet.config.cross_attention_dim


def test_uri_model_is_downloaded_and_matches(tmp_path: Path) -> None:
    store = ObjectStore()
    src = build_tiny_pipeline(tmp_path / "build")
    uri = (tmp_path / "bucket" / "models" / "sd").as_uri()
    store.upload_dir(src, uri)
    comps = load_components(BaseModelSpec(uri=uri), store, tmp_path / "cache")
    assert comps.model_dir.is_relative_to(tmp_path / "cache")
    ref = load_components(BaseModelSpec(tiny=True), store, tmp_path / "build-cache")
    for a, b in zip(comps.unet.parameters(), ref.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    # the second load reuses the download
    assert load_components(BaseModelSpec(uri=uri), store, tmp_path / "cache").model_dir == comps.model_dir


def test_wrong_uri_names_it(tmp_path: Path) -> None:
    uri = (tmp_path / "nothing-here").as_uri()
    with pytest.raises(InvalidInputError, match="nothing-here"):
        load_components(BaseModelSpec(uri=uri), ObjectStore(), tmp_path / "cache")


def test_incomplete_folder_names_missing_parts(tmp_path: Path) -> None:
    store = ObjectStore()
    uri = (tmp_path / "bucket" / "broken").as_uri()
    store.write_bytes(uri + "/model_index.json", b"{}")
    store.write_bytes(uri + "/unet/config.json", b"{}")
    with pytest.raises(InvalidInputError, match=r"broken.*missing.*vae"):
        load_components(BaseModelSpec(uri=uri), store, tmp_path / "cache")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache that holds `dreambooth-test/tiny-sd` at main (the real huggingface_hub library reads it
    with the hub switched off, as in a cluster that has a pre-filled model cache and no internet)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    repo = cache / "hub" / "models--dreambooth-test--tiny-sd"
    shutil.copytree(build_tiny_pipeline(tmp_path / "build"), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.mark.parametrize("revision", ["main", COMMIT])
def test_hub_id_loads_from_the_hub_cache(offline_hub_cache: Path, revision: str) -> None:
    comps = load_components(
        BaseModelSpec(id="dreambooth-test/tiny-sd", revision=revision), ObjectStore(), offline_hub_cache
    )
    assert comps.model_dir.name == COMMIT
    assert comps.identity == f"hub:dreambooth-test/tiny-sd@{COMMIT}"  # the resolved commit, not the branch
    assert not any(p.requires_grad for p in comps.unet.parameters())


def test_hub_id_that_cannot_be_fetched_is_retryable_and_named(offline_hub_cache: Path) -> None:
    with pytest.raises(RetryableError, match=r"dreambooth-test/tiny-sd@v2"):
        load_components(BaseModelSpec(id="dreambooth-test/tiny-sd", revision="v2"), ObjectStore(), offline_hub_cache)


def test_shared_model_cache_env_and_concurrent_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With DREAMBOOTH_MODEL_CACHE_DIR (the operator's model cache volume) base models land in the shared folder;
    pods that download the same model at once all end up with one complete copy and no leftovers."""
    from concurrent.futures import ThreadPoolExecutor

    from dreambooth_api.env import MODEL_CACHE_DIR as MODEL_CACHE_ENV
    from dreambooth_trainer.components import model_cache_dir, resolve_model_dir

    assert model_cache_dir(tmp_path / "own") == tmp_path / "own"
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "shared"))
    cache = model_cache_dir(tmp_path / "own")
    assert cache == tmp_path / "shared" / "models"

    store = ObjectStore()
    uri = (tmp_path / "bucket" / "sd").as_uri()
    store.upload_dir(build_tiny_pipeline(tmp_path / "build"), uri)
    spec = BaseModelSpec(uri=uri)
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda _: resolve_model_dir(spec, store, cache), range(4)))
    assert len(set(dirs)) == 1
    folder = dirs[0]
    assert folder.is_relative_to(cache)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folders left
    load_components(spec, store, cache)

    # a partial folder without the completion marker (as a download before atomic renames could leave) is replaced
    (folder / ".complete").unlink()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert resolve_model_dir(spec, store, cache) == folder
    assert (folder / ".complete").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # partial downloads: one abandoned by a pod killed hours ago is swept, a live one is left alone
    (folder / ".complete").unlink()
    abandoned, live = cache / "models" / f".{folder.name}-dead", cache / "models" / f".{folder.name}-live"
    for partial in (abandoned, live):
        (partial / "unet").mkdir(parents=True)
        (partial / "unet" / "part").write_bytes(b"x")
    old = time.time() - 7 * 3600
    for path in (abandoned, abandoned / "unet", abandoned / "unet" / "part"):
        os.utime(path, (old, old))
    assert resolve_model_dir(spec, store, cache) == folder
    assert not abandoned.exists()
    assert live.exists()


def test_hub_listing_selects_bin_weights_and_the_identity_is_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repository with only .bin weights: the hub's file list goes through the same selection as object storage."""
    import huggingface_hub
    from huggingface_hub import constants

    listing = [
        "model_index.json",
        "safety_checker/pytorch_model.bin",
        *(f"{part}/config.json" for part in ("unet", "vae", "text_encoder")),
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ]
    snapshot = tmp_path / "snapshots" / COMMIT
    shutil.copytree(build_tiny_pipeline(tmp_path / "build"), snapshot)
    calls: list[dict[str, object]] = []

    def model_info(_self: object, repo_id: str, revision: str | None = None, **_: object) -> object:
        assert (repo_id, revision) == ("org/bin-only", "main")
        return SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename=f) for f in listing])

    def snapshot_download(**kw: object) -> str:
        calls.append(kw)
        return str(snapshot)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    comps = load_components(BaseModelSpec(id="org/bin-only"), ObjectStore(), tmp_path / "cache")
    [call] = calls
    assert call["revision"] == "main"
    assert call["allow_patterns"] == select_files(listing, None)
    assert "unet/diffusion_pytorch_model.bin" in call["allow_patterns"]  # type: ignore[operator]
    assert "safety_checker/pytorch_model.bin" not in call["allow_patterns"]  # type: ignore[operator]
    assert comps.identity == f"hub:org/bin-only@{COMMIT}"


def test_overwritten_uri_model_is_downloaded_again(tmp_path: Path) -> None:
    """Re-uploading different weights to the same URI changes the model's identity and its cache folder."""
    from safetensors.torch import load_file, save_file

    store = ObjectStore()
    uri = (tmp_path / "bucket" / "sd").as_uri()
    src = build_tiny_pipeline(tmp_path / "build")
    store.upload_dir(src, uri)
    first = load_components(BaseModelSpec(uri=uri), store, tmp_path / "cache")
    assert first.identity.startswith(f"uri:{uri}#")

    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    changed = {k: v + 1.0 for k, v in load_file(weights).items()}
    save_file(changed, tmp_path / "changed.safetensors")
    store.upload_file(tmp_path / "changed.safetensors", f"{uri}/unet/diffusion_pytorch_model.safetensors")
    second = load_components(BaseModelSpec(uri=uri), store, tmp_path / "cache")
    assert second.identity != first.identity
    assert second.model_dir != first.model_dir
    name, param = next(iter(second.unet.named_parameters()))
    assert torch.equal(param, changed[name])

"""The `gpu` tier: every test here needs CUDA and is skipped, with the reason, without it.

These tests run on the lent device machine through `bench/device_check.sh`, which points pytest at this folder
only (`--confcutdir tests/gpu`), so nothing here may rely on the root conftest's plugins (test binaries, S3, the
node agent). Our packages come from PYTHONPATH there, not from an install.

Shared pieces: the tiny model (built from configs, cached by config hash), and a small DreamBooth batch whose
instance image is a red square and whose class image is a blue one, both made with numpy.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

# The tiny model is cached by config hash, so every test (and the unit tier on the same machine) shares one build.
SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"
RESOLUTION = 32


# A debugging aid, never set in CI: run the tests' code paths on CPU (CUDA-only assertions then fail), to catch
# API mistakes before the one run on the device machine.
DRY_RUN_ON_CPU = os.environ.get("DREAMBOOTH_GPU_TESTS_ON_CPU") == "1"


@pytest.fixture(autouse=True)
def _require_cuda() -> None:
    if not torch.cuda.is_available() and not DRY_RUN_ON_CPU:
        pytest.skip("gpu tier: needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def square(color: tuple[int, int, int], size: int = RESOLUTION) -> Image.Image:
    arr = np.full((size, size, 3), 128, np.uint8)
    arr[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = color
    return Image.fromarray(arr)


def load_tiny() -> Any:
    """Fresh tiny UNet/VAE/text encoder (on CPU, fp32, frozen), as the trainer loads them."""
    from dreambooth_api.config import BaseModelSpec
    from dreambooth_trainer.components import load_components
    from dreambooth_trainer.storage import ObjectStore

    return load_components(BaseModelSpec(tiny=True), ObjectStore(), SHARED_MODELS)


@pytest.fixture
def tiny_components() -> Any:
    return load_tiny()


@pytest.fixture
def components_factory() -> Any:
    return load_tiny


def cache_on_their_device(dataset: Any, components: Any) -> None:
    """Cache latents and prompt embeddings with the VAE and text encoder where they are now: a module built from
    `components` moves them to the GPU (`.to`, `fabric.setup`) and mixed precision casts them to fp16/bf16."""
    vae = next(components.vae.parameters())
    text = next(components.text_encoder.parameters())
    with torch.no_grad():
        dataset.cache_latents(components.vae, device=vae.device, dtype=vae.dtype)
        dataset.cache_text_embeddings(components.text_encoder, device=text.device)


def make_batch(components: Any, device: torch.device, n: int = 2, prior: bool = True) -> dict[str, Any]:
    """A collated batch with cached VAE latents and prompt embeddings (the trainer's default path)."""
    from dreambooth_trainer.data import DreamBoothDataset, Example, collate_fn

    classes = [Example("c", square((0, 0, 255)), "a photo of dog")] if prior else None
    ds = DreamBoothDataset(
        [Example("i", square((255, 0, 0)), "a photo of sks dog")], components.tokenizer, RESOLUTION, classes
    )
    cache_on_their_device(ds, components)
    batch = collate_fn([ds[0]] * n)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.fixture
def batch_factory() -> Any:
    return make_batch


def fixed_loss(module: Any, batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None) -> float:
    """The loss averaged over four fixed (noise, timestep) draws, so before/after comparisons are fair."""
    total = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for seed in range(4):
            total += float(module.compute_loss(batch, torch.Generator(device).manual_seed(seed)))
    return total / 4


@pytest.fixture
def loss_at_fixed_noise() -> Any:
    return fixed_loss


def write_subject(folder: Path, count: int = 3) -> None:
    """A subject folder of PNG photos (random noise with a coloured square), made with numpy."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        arr[10:30, 12:36] = (200, 40 * i, 30)
        Image.fromarray(arr).save(folder / f"img{i}.png")


def job_config(root: Path, method: str = "lora", **training: Any) -> Any:
    """A JobConfig for the tiny model with file:// storage under `root` (overrides go into spec.training)."""
    from dreambooth_api.config import parse_job_config

    write_subject(root / "subject")
    return parse_job_config(
        {
            "name": "gpu-test",
            "namespace": "tests",
            "baseModel": {"tiny": True},
            "instanceImages": {"uri": (root / "subject").as_uri(), "prompt": "a photo of sks dog", "minResolution": 32},
            "training": {
                "method": method,
                "resolution": RESOLUTION,
                "maxSteps": 4,
                "learningRate": 1e-3,
                "checkpoint": {"intervalSteps": 2, "intervalSeconds": None, "keep": 2},
                **training,
            },
            "output": {"uri": (root / "out").as_uri(), "formats": ["lora" if method == "lora" else "diffusers"]},
        }
    )


def make_loop(config: Any, components: Any, scratch: Path) -> Any:
    """The trainer's own loop on this machine's accelerator, built as a job builds it (`builder.build_training`)."""
    from dreambooth_trainer.builder import build_training, make_fabric
    from dreambooth_trainer.data import DreamBoothDataset, Example
    from dreambooth_trainer.preemption import Preemption
    from dreambooth_trainer.storage import ObjectStore

    scratch.mkdir(parents=True, exist_ok=True)
    fabric = make_fabric(config, local=True)
    fabric.launch()
    classes = [Example("c", square((0, 0, 255)), "a photo of dog")]
    dataset = DreamBoothDataset(
        [
            Example("i", square((255, 0, 0)), "a photo of sks dog"),
            Example("j", square((0, 255, 0)), "a photo of sks dog"),
        ],
        components.tokenizer,
        config.training.resolution,
        classes,
    )
    cache_on_their_device(dataset, components)
    training = build_training(
        config, components, dataset, fabric=fabric, store=ObjectStore(), preemption=Preemption(), scratch=scratch
    )
    return training.loop


@pytest.fixture
def loop_factory() -> Any:
    return make_loop


@pytest.fixture
def config_factory() -> Any:
    return job_config

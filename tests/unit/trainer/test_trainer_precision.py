"""How a job's precision settings become Fabric's precision and torch's TF32 switches."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

from dreambooth_api.config import JobConfig
from dreambooth_trainer.builder import configure_cuda_math, fabric_precision
from tests.infra.paths import TESTS


def _config(**training: Any) -> JobConfig:
    return JobConfig.model_validate(
        {
            "instanceImages": {"uri": "file:///in", "prompt": "a sks dog"},
            "output": {"uri": "file:///out"},
            "training": training,
        }
    )


@pytest.fixture
def _restore_tf32() -> Iterator[None]:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.usefixtures("_restore_tf32")
def test_tf32_is_on_by_default_and_can_be_turned_off() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    configure_cuda_math(_config())
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cudnn.allow_tf32 is True
    configure_cuda_math(_config(allowTf32=False))
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False


@pytest.mark.parametrize(
    ("mixed", "cuda", "expected"),
    [("no", True, "32-true"), ("bf16", True, "bf16-mixed"), ("fp16", True, "16-mixed"), ("bf16", False, "32-true")],
)
def test_fabric_precision(mixed: str, cuda: bool, expected: str) -> None:
    assert fabric_precision(_config(mixedPrecision=mixed), cuda) == expected


def _gpu_conftest() -> ModuleType:
    """tests/gpu/conftest.py, for its batch helper (it is not a package module)."""
    path = TESTS / "gpu" / "conftest.py"
    spec = importlib.util.spec_from_file_location("gpu_tier_conftest", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gpu_tier_batches_are_encoded_by_half_precision_frozen_parts(method: str) -> None:
    """The gpu tier builds its batch after mixed precision cast the shared VAE and text encoder to bf16 (and moved
    them to the GPU): the helper must encode with them as they are. CPU autocast supports bf16, so this runs here."""
    from dreambooth_api.config import TrainingConfig
    from dreambooth_trainer.module import DreamBoothModule

    gpu = _gpu_conftest()
    components = gpu.load_tiny()
    module = DreamBoothModule(components, TrainingConfig(method=method, resolution=gpu.RESOLUTION))
    module.cast_frozen(torch.bfloat16)  # as make_loop does for mixedPrecision bf16 on CUDA

    batch = gpu.make_batch(components, torch.device("cpu"))

    assert batch["latent_params"].dtype == torch.float32
    assert batch["latent_params"].shape[0] == 4  # two instance rows, two class rows
    assert "prompt_embeds" in batch
    loss = gpu.fixed_loss(module, batch, torch.device("cpu"), torch.bfloat16)
    assert math.isfinite(loss)

"""How a job's precision settings become Fabric's precision and torch's TF32 switches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from dreambooth_trainer.config import JobConfig
from dreambooth_trainer.train import configure_cuda_math, fabric_precision


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

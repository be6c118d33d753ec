"""8-bit AdamW (`training.optimizer: adamw8bit`, bitsandbytes) on the CPU with the tiny model: it is bitsandbytes'
optimizer with uint8 moments, it learns like AdamW, and its quantized state goes through a checkpoint and back
exactly, so a resumed run continues bitwise like an uninterrupted one. The CUDA side (bf16) is in tests/gpu.

The tiny model, batch, fixed-noise loss, job config and loop wiring are the gpu tier's helpers, which also run on
the CPU.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from bitsandbytes.optim.adamw import AdamW8bit

from dreambooth_api.config import TrainingConfig
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.checkpoint import to_cpu
from dreambooth_trainer.module import DreamBoothModule
from tests.gpu.conftest import fixed_loss, job_config, load_tiny, make_batch, make_loop

CPU = torch.device("cpu")
# bitsandbytes keeps fp32 moments for tensors smaller than this (its `min_8bit_size` default).
MIN_8BIT_SIZE = 4096
QUANTIZED_KEYS = {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _state(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The live per-parameter state (bitsandbytes' own keys, not its state_dict's wrapped form), as CPU copies."""
    return [to_cpu(dict(optimizer.state[p])) for p in _params(optimizer)]


def test_adamw8bit_is_bitsandbytes_with_uint8_moments_and_learns() -> None:
    components = load_tiny()
    module = DreamBoothModule(
        components, TrainingConfig(method="full", resolution=32, learning_rate=1e-3, optimizer="adamw8bit")
    )
    batch = make_batch(components, CPU, n=4, prior=False)
    before = fixed_loss(module, batch, CPU, None)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    torch.manual_seed(0)
    for _ in range(25):
        module.compute_loss(batch).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    after = fixed_loss(module, batch, CPU, None)

    assert isinstance(optimizer, AdamW8bit)
    assert module.optimizer_steps == 25
    # The same threshold as AdamW's full fine-tune test (tests/unit/test_trainer_module.py).
    assert after < 0.5 * before, (before, after)
    large = [p for p in _params(optimizer) if p.numel() >= MIN_8BIT_SIZE]
    assert large  # the tiny UNet has convolutions and projections above bitsandbytes' 8-bit threshold
    for param in _params(optimizer):
        state = optimizer.state[param]
        assert state["step"] == 25
        if param.numel() >= MIN_8BIT_SIZE:
            assert state.keys() >= QUANTIZED_KEYS
            assert state["state1"].dtype == state["state2"].dtype == torch.uint8
            assert state["state1"].shape == param.shape
            assert state["absmax1"].dtype == torch.float32
        else:
            assert state["state1"].dtype == torch.float32


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def test_adamw8bit_state_round_trips_through_a_checkpoint_and_the_run_resumes_exactly(tmp_path: Path) -> None:
    training = {"optimizer": "adamw8bit", "learningRate": 1e-3, "maxSteps": 6}
    uninterrupted = make_loop(job_config(tmp_path / "a", "full", **training), load_tiny(), tmp_path / "a" / "scratch")
    try:
        expected = [uninterrupted.train_step(step)[0] for step in range(6)]
    finally:
        uninterrupted.close()

    config = job_config(tmp_path / "b", "full", **training)
    first = make_loop(config, load_tiny(), tmp_path / "b" / "scratch1")
    try:
        losses = [first.train_step(step)[0] for step in range(3)]
        first.ckpt.write(first.snapshot(3))
        saved = _state(first.optimizer.optimizer)
    finally:
        first.close()

    second = make_loop(config, load_tiny(), tmp_path / "b" / "scratch2")
    try:
        assert second.resume() == 3
        optimizer = second.optimizer.optimizer
        restored = _state(optimizer)
        losses += [second.train_step(step)[0] for step in range(3, 6)]
    finally:
        second.close()

    assert isinstance(optimizer, AdamW8bit)
    quantized = [s for s in saved if "absmax1" in s]
    assert quantized
    assert all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in quantized)
    assert len(restored) == len(saved)
    for index, (want, got) in enumerate(zip(saved, restored, strict=True)):
        assert _equal(want, got), index
    # The restored moments drive the next steps: the resumed run's losses are the uninterrupted run's, bitwise.
    assert losses == expected


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None in sys.modules makes importing that name raise ImportError, as if bitsandbytes were not installed.
    for name in [m for m in sys.modules if m.split(".")[0] == "bitsandbytes"]:
        monkeypatch.setitem(sys.modules, name, None)
    module = DreamBoothModule(load_tiny(), TrainingConfig(method="lora", optimizer="adamw8bit"))
    hint = re.escape("optimizer adamw8bit needs bitsandbytes (pip install dreambooth-trainer[bnb])")
    with pytest.raises(InvalidInputError, match=hint):
        module.configure_optimizers()

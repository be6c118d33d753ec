"""The trainer on CUDA: fused AdamW, bf16 and fp16 mixed precision, 8-bit AdamW, the checkpoint round trip (weights,
optimizer and the CUDA RNG) through the trainer's own loop, and torch.compile of the UNet, on the tiny model.
The compile test is last: it is the slowest, so a step timeout on the device machine cuts it first."""

from __future__ import annotations

import math
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer Fabric wraps (`_FabricOptimizer.optimizer`)."""
    return getattr(optimizer, "optimizer", optimizer)  # type: ignore[no-any-return]


def _train(loop: Any, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        loss, _ = loop.train_step(step)
        losses.append(loss)
    return losses


@pytest.mark.parametrize("method", ["lora", "full"])
def test_adamw_is_fused_on_cuda_and_steps(
    method: str, tiny_components: Any, device: torch.device, batch_factory: Any
) -> None:
    from dreambooth_api.config import TrainingConfig
    from dreambooth_trainer.module import DreamBoothModule

    module = DreamBoothModule(tiny_components, TrainingConfig(method=method, resolution=32, learning_rate=1e-3))
    module.to(device)
    optimizer = module.configure_optimizers()["optimizer"]
    before = [p.detach().clone() for p in module.unet_parameters()]
    module.compute_loss(batch_factory(tiny_components, device)).backward()
    optimizer.step()
    after = list(module.unet_parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert all(p.is_cuda for p in after)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize(("method", "lr"), [("full", 1e-3), ("lora", 1e-2)])
def test_bf16_mixed_trains_with_finite_decreasing_loss(
    method: str,
    lr: float,
    tmp_path: Path,
    tiny_components: Any,
    loop_factory: Any,
    config_factory: Any,
    loss_at_fixed_noise: Any,
    batch_factory: Any,
    device: torch.device,
) -> None:
    # 100 steps: at 30 LoRA's drop was 0.79x on the CPU dry run, too close to the 0.8x bound.
    config = config_factory(tmp_path, method=method, learningRate=lr, mixedPrecision="bf16", maxSteps=100)
    loop = loop_factory(config, tiny_components, tmp_path / "scratch")
    try:
        module = loop.module
        batch = batch_factory(tiny_components, device)
        before = loss_at_fixed_noise(module, batch, device, torch.bfloat16)
        losses = _train(loop, 100)
        after = loss_at_fixed_noise(module, batch, device, torch.bfloat16)
    finally:
        loop.close()
    assert all(math.isfinite(v) for v in losses), losses
    assert after < 0.8 * before, (before, after, losses)
    # Frozen parts are stored in bf16; trained weights stay fp32 (the optimizer's master copy).
    assert next(module.vae.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.is_cuda for p in module.unet_parameters())
    assert type(loop.fabric._precision).__name__ == "MixedPrecision"
    assert loop.fabric._precision.precision == "bf16-mixed"


@pytest.mark.parametrize("mixed", ["bf16", "fp16"])
def test_validation_samples_a_full_fine_tune_in_mixed_precision(
    mixed: str, tmp_path: Path, tiny_components: Any, loop_factory: Any, config_factory: Any
) -> None:
    """Full fine-tuning keeps the UNet in fp32 while mixed precision casts the frozen VAE and text encoder: the
    validation hook must still sample (it runs inside the training loop, so a failure fails the job)."""
    from dreambooth_trainer.storage import ObjectStore
    from dreambooth_trainer.validation import sample_and_upload

    config = config_factory(
        tmp_path,
        method="full",
        mixedPrecision=mixed,
        trainTextEncoder=True,
        maxSteps=1,
        validation={"prompts": ["a photo of sks dog"], "intervalSteps": 1, "steps": 2, "numImages": 1},
    )
    loop = loop_factory(config, tiny_components, tmp_path / "scratch")
    try:
        _train(loop, 1)
        uris = sample_and_upload(config, loop.module, ObjectStore(), 1)
        vae_dtype = next(loop.module.vae.parameters()).dtype
    finally:
        loop.close()
    assert uris == [(tmp_path / "out" / "samples" / "step-00000001" / "p0-i0.png").as_uri()]
    assert (tmp_path / "out" / "samples" / "step-00000001" / "p0-i0.png").stat().st_size > 0
    assert vae_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed]


def test_fp16_uses_a_grad_scaler_and_learns(
    tmp_path: Path,
    tiny_components: Any,
    loop_factory: Any,
    config_factory: Any,
    loss_at_fixed_noise: Any,
    batch_factory: Any,
    device: torch.device,
) -> None:
    # 100 steps: at 30 the drop was 0.81x with torch 2.11 on the CPU dry run, too close to the 0.8x bound.
    config = config_factory(tmp_path, method="lora", learningRate=1e-2, mixedPrecision="fp16", maxSteps=100)
    loop = loop_factory(config, tiny_components, tmp_path / "scratch")
    try:
        module = loop.module
        batch = batch_factory(tiny_components, device)
        before = loss_at_fixed_noise(module, batch, device, torch.float16)
        losses = _train(loop, 100)
        after = loss_at_fixed_noise(module, batch, device, torch.float16)
        snapshot = loop.snapshot(100)
    finally:
        loop.close()
    assert all(math.isfinite(v) for v in losses), losses
    assert after < 0.8 * before, (before, after, losses)
    scaler = loop._scaler()
    assert isinstance(scaler, torch.amp.GradScaler)
    assert math.isfinite(scaler.get_scale())
    assert scaler.get_scale() > 0
    # The scaler's state travels with the checkpoint, so a resumed fp16 run keeps its loss scale.
    assert snapshot.scaler is not None
    assert snapshot.scaler["scale"] == scaler.get_scale()
    unet_dtypes = {p.dtype for n, p in module.unet.named_parameters() if "lora_" not in n}
    assert unet_dtypes == {torch.float16}
    assert all(p.dtype == torch.float32 for p in module.unet_parameters())


def test_adamw_8bit_steps_and_checkpoints(
    tmp_path: Path,
    tiny_components: Any,
    loop_factory: Any,
    config_factory: Any,
    loss_at_fixed_noise: Any,
    batch_factory: Any,
    device: torch.device,
) -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed on this machine")
    config = config_factory(
        tmp_path, method="full", optimizer="adamw8bit", learningRate=1e-3, mixedPrecision="bf16", maxSteps=50
    )
    loop = loop_factory(config, tiny_components, tmp_path / "scratch")
    try:
        module = loop.module
        batch = batch_factory(tiny_components, device)
        before = loss_at_fixed_noise(module, batch, device, torch.bfloat16)
        losses = _train(loop, 50)
        after = loss_at_fixed_noise(module, batch, device, torch.bfloat16)
        optimizer = _inner(loop.optimizer)
        # 8-bit state (uint8 moments) for the large tensors: that is what saves the memory.
        state_dtypes = {v.dtype for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
        # The optimizer state goes through the checkpoint and back.
        info = loop.ckpt.write(loop.snapshot(50))
        loop.restore(loop.ckpt.load(info.step))
        more = _train(loop, 2, start=50)
    finally:
        loop.close()
    assert type(optimizer).__name__ == "AdamW8bit"
    assert torch.uint8 in state_dtypes, state_dtypes
    assert all(math.isfinite(v) for v in losses + more), losses + more
    assert after < 0.8 * before, (before, after, losses)


def test_checkpoint_round_trip_restores_weights_optimizer_and_cuda_rng(
    tmp_path: Path, loop_factory: Any, config_factory: Any, components_factory: Any, device: torch.device
) -> None:
    fresh = components_factory
    config = config_factory(tmp_path, method="lora", learningRate=1e-2, mixedPrecision="bf16", maxSteps=4)
    first = loop_factory(config, fresh(), tmp_path / "scratch1")
    try:
        outcome = first.run()
        # Nothing draws random numbers after the final checkpoint, so the generator now is the saved one.
        cuda_state = torch.cuda.get_rng_state(device)
        expected_draw = torch.randn(16, device=device)
        weights = {k: v.clone() for k, v in first.module.trainable_state_dict().items()}
        optimizer_state = _inner(first.optimizer).state_dict()
    finally:
        first.close()
    assert outcome.status == "completed"
    assert outcome.step == 4
    assert outcome.last_checkpoint is not None
    assert outcome.last_checkpoint.step == 4
    assert (tmp_path / "out" / "checkpoints" / "step-00000004" / "manifest.json").is_file()

    torch.cuda.manual_seed_all(987654)
    torch.randn(1000, device=device)
    assert not torch.equal(torch.cuda.get_rng_state(device), cuda_state)

    second = loop_factory(config, fresh(), tmp_path / "scratch2")
    try:
        assert second.resume() == 4
        restored_state = torch.cuda.get_rng_state(device)
        draw = torch.randn(16, device=device)
        restored = second.module.trainable_state_dict()
        restored_opt = _inner(second.optimizer).state_dict()
    finally:
        second.close()
    assert torch.equal(restored_state, cuda_state)
    assert torch.equal(draw, expected_draw)
    assert restored.keys() == weights.keys()
    for key, value in weights.items():
        assert restored[key].device == value.device, key
        assert torch.equal(restored[key], value), key
    moments = [s["exp_avg"] for s in restored_opt["state"].values()]
    assert moments
    assert all(m.is_cuda for m in moments)
    for index, state in optimizer_state["state"].items():
        assert torch.equal(restored_opt["state"][index]["exp_avg"], state["exp_avg"])
        assert torch.equal(restored_opt["state"][index]["exp_avg_sq"], state["exp_avg_sq"])


def _compile_toolchain_missing() -> str | None:
    """Why Triton could not build its launcher here (it compiles a small C extension at first use), or None."""
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler (cc, gcc, clang) on PATH"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python.h (Python development headers)"
    return None


def test_torch_compile_of_the_unet_runs_training_steps(
    tmp_path: Path, tiny_components: Any, loop_factory: Any, config_factory: Any, device: torch.device
) -> None:
    """training.compileUnet on CUDA: Triton kernels for the UNet's training step under our loss, loop and bf16
    autocast (the CPU/inductor path is in tests/unit/test_trainer_compile.py)."""
    missing = _compile_toolchain_missing() if device.type == "cuda" else None
    if missing:
        pytest.skip(f"torch.compile (Triton) cannot build its launcher: {missing}")
    import torch._dynamo

    torch._dynamo.reset()
    config = config_factory(
        tmp_path, method="lora", learningRate=1e-2, mixedPrecision="bf16", maxSteps=3, compileUnet=True
    )
    loop = loop_factory(config, tiny_components, tmp_path / "scratch")
    try:
        eager = {
            n: p.detach().clone() for n, p in zip(loop.module._unet_names, loop.module.unet_parameters(), strict=True)
        }
        assert loop.module._training_unet, "compileUnet did not route the loss through torch.compile"
        losses = _train(loop, 3)
        trained = dict(zip(loop.module._unet_names, loop.module.unet_parameters(), strict=True))
    finally:
        loop.close()
    from torch._dynamo.utils import counters

    # Dynamo's own counters (internal, so either name counts): at least one graph was captured and compiled.
    assert counters["stats"]["unique_graphs"] + counters["frames"]["ok"] >= 1, {k: dict(v) for k, v in counters.items()}
    assert all(math.isfinite(v) for v in losses), losses
    assert any(not torch.equal(eager[n], trained[n]) for n in eager)

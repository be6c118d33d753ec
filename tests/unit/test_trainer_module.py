"""The DreamBooth LightningModule on the tiny model: the loss learns, LoRA trains only adapters, the text encoder
stops at textEncoderSteps, prior weighting, v-prediction, and the trainable state round trip."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_trainer.components import Components, load_components
from dreambooth_trainer.config import BaseModelSpec, TrainingConfig
from dreambooth_trainer.data import DreamBoothDataset, Example, collate_fn
from dreambooth_trainer.exitcodes import InvalidInputError
from dreambooth_trainer.module import STEP_KEY, DreamBoothModule
from dreambooth_trainer.storage import ObjectStore

# The tiny model is cached by config hash, so test files share one build.
SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    return SHARED_MODELS


def components(cache_dir: Path) -> Components:
    return load_components(BaseModelSpec(tiny=True), ObjectStore(), cache_dir)


def square(color: tuple[int, int, int]) -> Image.Image:
    arr = np.full((32, 32, 3), 128, np.uint8)
    arr[8:24, 8:24] = color
    return Image.fromarray(arr)


def make_batch(comps: Components, prior: bool = False, cache: bool = True, n: int = 4) -> dict[str, Any]:
    classes = [Example("c", square((0, 0, 255)), "a photo of dog")] if prior else None
    ds = DreamBoothDataset([Example("i", square((255, 0, 0)), "a photo of sks dog")], comps.tokenizer, 32, classes)
    if cache:
        ds.cache_latents(comps.vae)
        ds.cache_text_embeddings(comps.text_encoder)
    return collate_fn([ds[0]] * n)


def fixed_loss(module: DreamBoothModule, batch: dict[str, Any]) -> float:
    with torch.no_grad():
        return sum(float(module.compute_loss(batch, torch.Generator().manual_seed(s))) for s in range(4)) / 4


def train(module: DreamBoothModule, batch: dict[str, Any], steps: int) -> None:
    torch.manual_seed(0)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for _ in range(steps):
        module.compute_loss(batch).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def test_full_finetune_loss_decreases(cache_dir: Path) -> None:
    comps = components(cache_dir)
    module = DreamBoothModule(comps, TrainingConfig(method="full", learning_rate=1e-3, resolution=32))
    batch = make_batch(comps)
    before = fixed_loss(module, batch)
    train(module, batch, 25)
    after = fixed_loss(module, batch)
    assert after < 0.5 * before, (before, after)
    assert module.optimizer_steps == 25


def test_lora_trains_only_adapters_and_learns(cache_dir: Path) -> None:
    comps = components(cache_dir)
    base = {n: p.detach().clone() for n, p in comps.unet.named_parameters()}
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: the same start every run
    module = DreamBoothModule(
        comps, TrainingConfig(method="lora", learning_rate=1e-2, resolution=32, lora={"rank": 4, "alpha": 4})
    )
    names = [n for n, p in module.unet.named_parameters() if p.requires_grad]
    assert names
    assert all("lora_" in n for n in names)
    batch = make_batch(comps, cache=False)
    before = fixed_loss(module, batch)
    train(module, batch, 25)
    assert fixed_loss(module, batch) < 0.8 * before
    for name, param in module.unet.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(param, base[key]), name
    state = module.trainable_state_dict()
    assert set(state) == {f"unet.{n}" for n in names} | {STEP_KEY}


def test_text_encoder_trains_only_for_text_encoder_steps(cache_dir: Path) -> None:
    comps = components(cache_dir)
    cfg = TrainingConfig(
        method="full",
        learning_rate=1e-3,
        resolution=32,
        train_text_encoder=True,
        text_encoder_steps=3,
        text_encoder_learning_rate=1e-3,
    )
    module = DreamBoothModule(comps, cfg)
    assert module.has_unused_parameters_later
    batch = make_batch(comps, cache=False)
    assert "input_ids" in batch
    initial = [p.detach().clone() for p in module.text_encoder_parameters()]
    train(module, batch, 3)
    after_three = [p.detach().clone() for p in module.text_encoder_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(initial, after_three, strict=True))
    assert not module.text_encoder_active()
    train(module, batch, 2)
    assert all(torch.equal(a, b) for a, b in zip(after_three, module.text_encoder_parameters(), strict=True))
    # the step count is part of the trainable state, so a resumed module also stops training the text encoder
    state = module.trainable_state_dict()
    fresh = DreamBoothModule(components(cache_dir), cfg)
    assert fresh.text_encoder_active()
    fresh.load_trainable_state_dict(state)
    assert fresh.optimizer_steps == 5
    assert not fresh.text_encoder_active()
    for a, b in zip(module.unet_parameters(), fresh.unet_parameters(), strict=True):
        assert torch.equal(a, b)


def test_prior_loss_is_weighted(cache_dir: Path) -> None:
    comps = components(cache_dir)
    module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32), prior_loss_weight=2.5)
    batch = make_batch(comps, prior=True, n=2)
    assert batch["num_instance"] == 2
    assert batch["latent_params"].shape[0] == 4
    with torch.no_grad():
        loss = module.compute_loss(batch, torch.Generator().manual_seed(0))
    parts = module.last_losses
    assert float(loss) == pytest.approx(parts["instance"] + 2.5 * parts["prior"], rel=1e-5)
    assert parts["prior"] != pytest.approx(parts["instance"])


def test_v_prediction_and_snr_weighting(cache_dir: Path) -> None:
    batch = make_batch(components(cache_dir))
    losses = {}
    for prediction_type in ("epsilon", "v_prediction"):
        comps = components(cache_dir)
        comps.noise_scheduler.register_to_config(prediction_type=prediction_type)
        module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32))
        with torch.no_grad():
            losses[prediction_type] = float(module.compute_loss(batch, torch.Generator().manual_seed(0)))
    assert losses["v_prediction"] != pytest.approx(losses["epsilon"])
    comps = components(cache_dir)
    comps.noise_scheduler.register_to_config(prediction_type="epsilon")
    snr = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32, snr_gamma=1.0))
    with torch.no_grad():
        snr_loss = float(snr.compute_loss(batch, torch.Generator().manual_seed(0)))
    # min(snr, 1) / snr <= 1 scales every sample down (or keeps it)
    assert np.isfinite(snr_loss)
    assert snr_loss < losses["epsilon"]


@pytest.mark.parametrize(("prediction_type", "at_zero_snr"), [("epsilon", 1.0), ("v_prediction", 0.0)])
def test_snr_weights_are_finite_at_the_zero_snr_of_a_rescaled_schedule(
    cache_dir: Path, prediction_type: str, at_zero_snr: float
) -> None:
    comps = components(cache_dir)
    assert comps.noise_scheduler.config.rescale_betas_zero_snr  # the tiny model's schedule ends at SNR 0
    module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32, snr_gamma=5.0))
    weights = module._snr_weights(torch.tensor([0, 500, 999]), prediction_type)
    assert torch.isfinite(weights).all()
    assert float(weights[-1]) == pytest.approx(at_zero_snr)
    assert ((weights > 0) & (weights <= 1)).tolist()[:2] == [True, True]


def test_adamw8bit_without_cuda_is_a_clear_error(cache_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("the error is for machines without CUDA")
    module = DreamBoothModule(components(cache_dir), TrainingConfig(method="lora", optimizer="adamw8bit"))
    with pytest.raises(InvalidInputError, match="adamw8bit needs a CUDA GPU"):
        module.configure_optimizers()


def test_load_rejects_mismatched_state(cache_dir: Path) -> None:
    module = DreamBoothModule(components(cache_dir), TrainingConfig(method="lora"))
    state = module.trainable_state_dict()
    state.pop(next(k for k in state if k != STEP_KEY))
    with pytest.raises(ValueError, match="missing"):
        module.load_trainable_state_dict(state)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(cache_dir: Path) -> None:
    comps = components(cache_dir)
    cfg = TrainingConfig(method="full", resolution=32, gradient_checkpointing=True, offset_noise=0.1)
    module = DreamBoothModule(comps, cfg)
    assert module.unet.is_gradient_checkpointing
    batch = make_batch(comps)
    loss = module.compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in module.unet_parameters()]
    assert all(g is not None for g in grads)
    reference = DreamBoothModule(components(cache_dir), cfg.model_copy(update={"gradient_checkpointing": False}))
    ref_loss = reference.compute_loss(batch, torch.Generator().manual_seed(0))
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    first = next(module.unet_parameters()).grad
    ref_first = next(reference.unet_parameters()).grad
    assert first is not None
    assert ref_first is not None
    torch.testing.assert_close(first, ref_first, rtol=1e-4, atol=1e-6)

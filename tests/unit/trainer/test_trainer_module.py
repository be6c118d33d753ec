"""The DreamBooth LightningModule on the tiny model: the loss learns, LoRA trains only adapters, the text encoder
stops at textEncoderSteps, prior weighting, v-prediction, and the trainable state round trip."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_api.config import BaseModelSpec, TrainingConfig
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.components import Components, load_components
from dreambooth_trainer.data import DreamBoothDataset, Example, collate_fn
from dreambooth_trainer.module import STEP_KEY, DreamBoothModule, lr_schedule_name
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


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: records the noisy latents and timesteps and predicts `predict(noisy, timesteps)`."""

    def __init__(self, predict: Any) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # compute_loss reads the UNet's dtype from a parameter
        self.predict = predict
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> Any:
        self.calls.append((sample.detach().clone(), timestep.clone()))
        return SimpleNamespace(sample=self.predict(sample, timestep))


def known_latents_batch(module: DreamBoothModule, means: torch.Tensor, num_instance: int) -> dict[str, Any]:
    """Cached-latent rows whose VAE distribution has (next to) zero variance, so the clean latents x0 are known."""
    logvar = torch.full_like(means, -30.0)  # std exp(-15): 3e-7
    hidden = torch.zeros(means.shape[0], 8, module.text_encoder.config.hidden_size)
    return {"latent_params": torch.cat([means, logvar], 1), "prompt_embeds": hidden, "num_instance": num_instance}


def clean_latents(module: DreamBoothModule, means: torch.Tensor) -> torch.Tensor:
    shift = getattr(module.vae.config, "shift_factor", None) or 0.0
    return (means - shift) * float(module.vae.config.scaling_factor)


def alpha_sigma(module: DreamBoothModule, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alphas_cumprod = module.noise_scheduler.alphas_cumprod[timesteps].double().view(-1, 1, 1, 1)
    return alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()


def expected_target(module: DreamBoothModule, x0: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """epsilon: the noise; v: alpha_t * noise - sigma_t * x0 (the noise solved from alpha_t x0 + sigma_t noise)."""
    alpha, sigma = alpha_sigma(module, t)
    noise = (noisy.double() - alpha * x0.double()) / sigma
    if module.noise_scheduler.config.prediction_type == "epsilon":
        return noise
    return alpha * noise - sigma * x0.double()


def latent_means(module: DreamBoothModule, rows: int, offset: float = 0.0, seed: int = 0) -> torch.Tensor:
    channels = int(module.vae.config.latent_channels)
    return torch.randn((rows, channels, 4, 4), generator=torch.Generator().manual_seed(seed)) * 0.5 + offset


def test_prior_loss_is_weighted(cache_dir: Path) -> None:
    comps = components(cache_dir)
    module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32), prior_loss_weight=2.5)
    stub = RecordingUNet(lambda noisy, t: torch.zeros_like(noisy))
    module.unet = stub
    # Two instance rows, then two class rows far from them: a wrong row split changes the expected loss.
    means = torch.cat([latent_means(module, 2, seed=1), latent_means(module, 2, offset=3.0, seed=2)])
    with torch.no_grad():
        loss = module.compute_loss(known_latents_batch(module, means, 2), torch.Generator().manual_seed(0))
    ((noisy, t),) = stub.calls
    per_row = expected_target(module, clean_latents(module, means), noisy, t).pow(2).mean(dim=(1, 2, 3))
    assert float(loss) == pytest.approx(float(per_row[:2].mean() + 2.5 * per_row[2:].mean()), rel=1e-4)
    assert module.last_losses["instance"] == pytest.approx(float(per_row[:2].mean()), rel=1e-4)
    assert module.last_losses["prior"] == pytest.approx(float(per_row[2:].mean()), rel=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_target_is_the_noise_or_the_velocity(cache_dir: Path, prediction_type: str) -> None:
    """A UNet that predicts exactly noise (epsilon) or alpha_t * noise - sigma_t * x0 (v) has zero loss."""
    comps = components(cache_dir)
    comps.noise_scheduler.register_to_config(prediction_type=prediction_type)
    module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32))
    means = latent_means(module, 4, offset=1.0)
    x0 = clean_latents(module, means)
    stub = RecordingUNet(lambda noisy, t: expected_target(module, x0, noisy, t).float())
    module.unet = stub
    batch = known_latents_batch(module, means, 4)
    with torch.no_grad():
        losses = [float(module.compute_loss(batch, torch.Generator().manual_seed(s))) for s in range(3)]
    stub.predict = lambda noisy, t: torch.zeros_like(noisy)
    with torch.no_grad():
        scale = float(module.compute_loss(batch, torch.Generator().manual_seed(0)))
    assert len({int(v) for _, ts in stub.calls for v in ts}) > 4  # several timesteps were drawn
    assert max(losses) < 1e-6 * scale, (losses, scale)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_weighting_is_min_snr_gamma(cache_dir: Path, prediction_type: str) -> None:
    """Per row: min(snr, gamma) / snr for epsilon, min(snr, gamma) / (snr + 1) for v; snr = alpha_t^2 / sigma_t^2."""
    comps = components(cache_dir)
    comps.noise_scheduler.register_to_config(prediction_type=prediction_type)
    module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32, snr_gamma=1.0))
    stub = RecordingUNet(lambda noisy, t: torch.zeros_like(noisy))
    module.unet = stub
    means = latent_means(module, 4, offset=1.0)
    with torch.no_grad():
        loss = module.compute_loss(known_latents_batch(module, means, 4), torch.Generator().manual_seed(0))
    ((noisy, t),) = stub.calls
    per_row = expected_target(module, clean_latents(module, means), noisy, t).pow(2).mean(dim=(1, 2, 3))
    alpha, sigma = alpha_sigma(module, t)
    snr = (alpha**2 / sigma**2).flatten()
    clipped = snr.clamp(max=1.0)
    if prediction_type == "epsilon":
        weights = torch.where(snr > 0, clipped / snr.clamp(min=1e-30), torch.ones_like(snr))
    else:
        weights = clipped / (snr + 1)
    assert float(loss) == pytest.approx(float((per_row * weights).mean()), rel=1e-4)


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


def test_unmatched_lora_targets_are_invalid_input(cache_dir: Path) -> None:
    from dreambooth_api.exitcodes import ExitCode
    from dreambooth_trainer.cli import classify

    cfg = TrainingConfig(method="lora", resolution=32, lora={"targetModules": ["to_qq"]})
    with pytest.raises(InvalidInputError, match=r"training\.lora\.targetModules.*to_qq") as info:
        DreamBoothModule(components(cache_dir), cfg)
    assert classify(info.value) == (ExitCode.INVALID_INPUT, "InvalidInput")


@pytest.mark.parametrize(
    ("schedule", "warmup", "expected"),
    [
        ("constant", 0, ("constant", 0)),
        ("constant", 10, ("constant_with_warmup", 10)),
        ("constant_with_warmup", 10, ("constant_with_warmup", 10)),
        ("cosine", 10, ("cosine", 10)),
    ],
)
def test_lr_schedule_name(schedule: str, warmup: int, expected: tuple[str, int]) -> None:
    assert lr_schedule_name(TrainingConfig(lr_schedule=schedule, warmup_steps=warmup, max_steps=50)) == expected


def test_warmup_applies_to_the_constant_schedule(cache_dir: Path) -> None:
    cfg = TrainingConfig(method="lora", resolution=32, learning_rate=1e-3, warmup_steps=4, max_steps=10)
    conf = DreamBoothModule(components(cache_dir), cfg).configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])

"""The DreamBooth LightningModule: the denoising loss, what is trained (full or LoRA), and its optimizer.

The UNet, VAE, text encoder, tokenizer and noise scheduler are injected (`components.Components`). The same module
works under a Lightning Trainer (`training_step`) and in a plain Fabric loop (`compute_loss(batch)`).

Loss: encode images to latents (or take cached VAE parameters), add noise at random timesteps (optionally with offset
noise), predict it with the UNet conditioned on the prompt, and regress the scheduler's target (epsilon, or v for
v-prediction). Optional min-SNR-gamma weighting. With prior preservation the batch's class rows (after
`num_instance`) give the prior loss, weighted by `prior_loss_weight`.

Text encoder: trained only with `trainTextEncoder`, and then only for the first `textEncoderSteps` optimizer steps.
The module counts optimizer steps itself (a post-step hook on the optimizer it builds), and the count is part of
`trainable_state_dict()`, so a resumed run stops training the text encoder at the same step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name

from dreambooth_api.config import LRSchedule, Method, Optimizer, TrainingConfig
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.components import Components

STEP_KEY = "meta.optimizer_steps"
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class DreamBoothModule(pl.LightningModule):
    """DreamBooth fine-tuning of a Stable Diffusion UNet (and optionally its text encoder)."""

    def __init__(self, components: Components, training: TrainingConfig, prior_loss_weight: float = 1.0) -> None:
        super().__init__()
        self.training_config = training
        self.prior_loss_weight = prior_loss_weight
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.noise_scheduler = components.noise_scheduler
        self.model_dir = components.model_dir
        self.optimizer_steps = 0
        self.last_losses: dict[str, float] = {}

        self.vae.requires_grad_(False)
        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self._use_sdpa()
        self._make_trainable()
        self._unet_names = [n for n, p in self.unet.named_parameters() if p.requires_grad]
        self._text_names = [n for n, p in self.text_encoder.named_parameters() if p.requires_grad]
        if not self._unet_names:
            raise InvalidInputError("nothing to train: no UNet parameters matched (check lora.targetModules)")
        if training.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self._text_names:
                self.text_encoder.gradient_checkpointing_enable()
        # The loss calls the UNet through this; validation and export use the eager module. A tuple, so the compiled
        # wrapper is not registered as a submodule (state dict keys stay those of the UNet). Compiled at first call.
        self._training_unet: tuple[Any, ...] = (torch.compile(self.unet),) if training.compile_unet else ()
        self.unet.train()
        self.vae.eval()
        self.text_encoder.train(bool(self._text_names))

    # ----- setup -------------------------------------------------------------------------------------------
    def _use_sdpa(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet.set_attn_processor(AttnProcessor2_0())

    def _make_trainable(self) -> None:
        t = self.training_config
        if t.method is Method.FULL:
            self.unet.requires_grad_(True)
            if t.train_text_encoder:
                self.text_encoder.requires_grad_(True)
            return
        from peft import LoraConfig

        spec = t.lora_or_default()

        def lora(targets: list[str]) -> LoraConfig:
            return LoraConfig(
                r=spec.rank,
                lora_alpha=spec.alpha,
                lora_dropout=spec.dropout,
                init_lora_weights="gaussian",
                target_modules=targets,
            )

        _add_adapter(self.unet, lora(list(spec.target_modules)), "training.lora.targetModules", "UNet")
        if t.train_text_encoder:
            _add_adapter(self.text_encoder, lora(TEXT_LORA_TARGETS), "training.trainTextEncoder", "text encoder")

    def train(self, mode: bool = True) -> DreamBoothModule:
        """Keep the frozen parts in eval mode when Lightning or Fabric switches the module to training."""
        super().train(mode)
        self.vae.eval()
        if not self._text_names:
            self.text_encoder.eval()
        return self

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Store frozen weights in `dtype` (fp16/bf16 on GPU saves memory); trained weights stay fp32."""
        from diffusers.training_utils import cast_training_params

        self.vae.to(dtype=dtype)
        if not self._text_names:
            self.text_encoder.to(dtype=dtype)
        if self.training_config.method is Method.LORA:
            self.unet.to(dtype=dtype)
            cast_training_params(self.unet, dtype=torch.float32)
            if self._text_names:
                self.text_encoder.to(dtype=dtype)
                cast_training_params(self.text_encoder, dtype=torch.float32)

    # ----- what is trained ---------------------------------------------------------------------------------
    @property
    def trains_text_encoder(self) -> bool:
        return bool(self._text_names)

    def text_encoder_active(self, step: int | None = None) -> bool:
        """Whether the text encoder is trained at this optimizer step (default: the current one)."""
        if not self._text_names:
            return False
        limit = self.training_config.text_encoder_steps
        return limit is None or (self.optimizer_steps if step is None else step) < limit

    @property
    def has_unused_parameters_later(self) -> bool:
        """True when some trained parameters stop getting gradients mid-run (DDP needs find_unused_parameters)."""
        return bool(self._text_names) and self.training_config.text_encoder_steps is not None

    def unet_parameters(self) -> Iterator[torch.nn.Parameter]:
        params = dict(self.unet.named_parameters())
        return (params[n] for n in self._unet_names)

    def text_encoder_parameters(self) -> Iterator[torch.nn.Parameter]:
        params = dict(self.text_encoder.named_parameters())
        return (params[n] for n in self._text_names)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what is trained (and the optimizer-step count), detached: what a checkpoint must hold."""
        unet = dict(self.unet.named_parameters())
        text = dict(self.text_encoder.named_parameters())
        out = {f"unet.{n}": unet[n].detach() for n in self._unet_names}
        out.update({f"text_encoder.{n}": text[n].detach() for n in self._text_names})
        out[STEP_KEY] = torch.tensor(self.optimizer_steps, dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `trainable_state_dict()` returned; the keys must match exactly."""
        expected = {f"unet.{n}" for n in self._unet_names} | {f"text_encoder.{n}" for n in self._text_names}
        got = set(state) - {STEP_KEY}
        if got != expected:
            missing, extra = sorted(expected - got)[:5], sorted(got - expected)[:5]
            raise ValueError(f"trainable state does not match this module: missing {missing}, unexpected {extra}")
        unet = dict(self.unet.named_parameters())
        text = dict(self.text_encoder.named_parameters())
        for key, value in state.items():
            if key == STEP_KEY:
                continue
            part, _, name = key.partition(".")
            target = unet[name] if part == "unet" else text[name]
            target.copy_(value.to(device=target.device, dtype=target.dtype))
        if STEP_KEY in state:
            self.optimizer_steps = int(state[STEP_KEY])

    # ----- the loss ------------------------------------------------------------------------------------------
    def _latents(self, batch: dict[str, Any], generator: torch.Generator | None) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            if "latent_params" in batch:
                dist = DiagonalGaussianDistribution(batch["latent_params"].to(dtype=torch.float32))
            else:
                dist = self.vae.encode(batch["pixel_values"].to(dtype=vae_dtype)).latent_dist
            latents: torch.Tensor = dist.sample(generator=generator).float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * float(self.vae.config.scaling_factor)

    def _encoder_hidden_states(self, batch: dict[str, Any]) -> torch.Tensor:
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"]  # type: ignore[no-any-return]
        ids = batch["input_ids"]
        if self.text_encoder_active():
            return self.text_encoder(ids)[0]  # type: ignore[no-any-return]
        with torch.no_grad():
            return self.text_encoder(ids)[0]  # type: ignore[no-any-return]

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The DreamBooth loss of one batch (from `data.collate_fn`). `generator` fixes noise and timesteps."""
        t = self.training_config
        latents = self._latents(batch, generator)
        bsz = latents.shape[0]
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        if t.offset_noise > 0:
            offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator, device=device)
            noise = noise + t.offset_noise * offset.to(latents.dtype)
        num_train = int(self.noise_scheduler.config.num_train_timesteps)
        timesteps = torch.randint(0, num_train, (bsz,), generator=generator, device=device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = self._encoder_hidden_states(batch)
        unet_dtype = next(self.unet.parameters()).dtype
        unet = self._training_unet[0] if self._training_unet else self.unet
        pred = unet(noisy.to(unet_dtype), timesteps, hidden.to(unet_dtype)).sample.float()

        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise InvalidInputError(f"unsupported scheduler prediction_type {prediction_type!r}")

        per_sample = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
        if t.snr_gamma is not None:
            per_sample = per_sample * self._snr_weights(timesteps, prediction_type)
        n_inst = int(batch.get("num_instance", bsz))
        instance_loss = per_sample[:n_inst].mean()
        loss = instance_loss
        losses = {"instance": float(instance_loss.detach())}
        if n_inst < bsz:
            prior_loss = per_sample[n_inst:].mean()
            loss = instance_loss + self.prior_loss_weight * prior_loss
            losses["prior"] = float(prior_loss.detach())
        self.last_losses = losses
        return loss

    def _snr_weights(self, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        gamma = float(self.training_config.snr_gamma or 0.0)
        snr: torch.Tensor = compute_snr(self.noise_scheduler, timesteps).float()
        clipped = torch.clamp(snr, max=gamma)
        if prediction_type == "v_prediction":
            return clipped / (snr + 1)
        # min(snr, gamma) / snr is 1 for every snr below gamma, including the zero SNR of a rescaled schedule's last
        # timestep (where the plain quotient is 0 / 0).
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))

    # ----- Lightning hooks --------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.compute_loss(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in self.last_losses.items():
            self.log(f"train/loss_{name}", value)
        return loss

    def _count_step(self, *_: Any) -> None:
        self.optimizer_steps += 1

    def configure_optimizers(self) -> Any:
        """AdamW (fused on CUDA) or 8-bit AdamW, one param group each for the UNet and the text encoder, and the
        configured LR schedule with warmup (stepped once per optimizer step)."""
        t = self.training_config
        groups: list[dict[str, Any]] = [{"params": list(self.unet_parameters()), "lr": t.learning_rate}]
        if self._text_names:
            groups.append(
                {
                    "params": list(self.text_encoder_parameters()),
                    "lr": t.text_encoder_learning_rate or t.learning_rate,
                }
            )
        optimizer: torch.optim.Optimizer
        if t.optimizer is Optimizer.ADAMW_8BIT:
            optimizer = _adamw_8bit(groups, t.adam_weight_decay)
        else:
            fused = torch.cuda.is_available()
            optimizer = torch.optim.AdamW(groups, weight_decay=t.adam_weight_decay, fused=fused or None)
        optimizer.register_step_post_hook(self._count_step)
        scheduler = build_lr_scheduler(optimizer, t)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_schedule_name(t: TrainingConfig) -> tuple[str, int]:
    """The diffusers `get_scheduler` name and warmup steps: `constant` with `warmupSteps` > 0 warms up first
    (`constant_with_warmup`), so the warmup is never dropped silently."""
    if t.lr_schedule is LRSchedule.CONSTANT and t.warmup_steps > 0:
        return LRSchedule.CONSTANT_WITH_WARMUP.value, t.warmup_steps
    return t.lr_schedule.value, t.warmup_steps


def split_optimizers(configured: Any) -> tuple[torch.optim.Optimizer, Any | None]:
    """Accept what `configure_optimizers()` may return: an optimizer, (optimizer, scheduler), ([opts], [scheds]),
    or {"optimizer": ..., "lr_scheduler": scheduler or {"scheduler": ...}}."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured, None
    if isinstance(configured, dict):
        sched = configured.get("lr_scheduler")
        if isinstance(sched, dict):
            sched = sched.get("scheduler")
        return configured["optimizer"], sched
    if isinstance(configured, list | tuple) and len(configured) == 2:
        opt, sched = configured
        opt = opt[0] if isinstance(opt, list | tuple) else opt
        sched = (sched[0] if sched else None) if isinstance(sched, list | tuple) else sched
        if isinstance(sched, dict):
            sched = sched.get("scheduler")
        return opt, sched
    raise TypeError(f"configure_optimizers returned an unsupported value: {type(configured).__name__}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, t: TrainingConfig) -> Any:
    """The configured LR schedule (with warmup) over `maxSteps` optimizer steps."""
    from diffusers.optimization import get_scheduler

    name, warmup = lr_schedule_name(t)
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=t.max_steps)


def _add_adapter(model: Any, config: Any, field: str, part: str) -> None:
    """`model.add_adapter(config)`; peft's ValueError for targets that match nothing is invalid input (exit 10)."""
    try:
        model.add_adapter(config)
    except ValueError as err:
        targets = sorted(config.target_modules)
        raise InvalidInputError(f"{field}: LoRA targets {targets} match no layer of the {part}: {err}") from err


def _adamw_8bit(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit: uint8 moments (block-wise quantized) for tensors of 4096 elements or more. It runs
    wherever bitsandbytes imports: on CUDA, and on the CPU with the pinned bitsandbytes 0.50 (the unit tier trains
    and resumes with it)."""
    try:
        from bitsandbytes.optim.adamw import AdamW8bit
    except ImportError as err:
        raise InvalidInputError("optimizer adamw8bit needs bitsandbytes (pip install dreambooth-trainer[bnb])") from err
    # bitsandbytes ships py.typed but leaves its optimizers' __init__ unannotated.
    return AdamW8bit(groups, weight_decay=weight_decay)  # type: ignore[no-untyped-call]

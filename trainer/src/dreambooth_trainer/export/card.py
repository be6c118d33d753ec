"""The model card: `README.md` under `output.uri`, with YAML front matter (the Hugging Face convention)."""

from __future__ import annotations

import json

from dreambooth_api.config import ExportFormat, JobConfig, Method


def training_settings(config: JobConfig) -> list[str]:
    """The model card's bullet lines on how the run trained (method-specific settings included)."""
    t = config.training
    warmup = f", {t.warmup_steps} warmup steps" if t.warmup_steps else ""
    lines = [
        f"- Resolution {t.resolution}, batch size {t.batch_size} x {t.gradient_accumulation} accumulation, "
        f"learning rate {t.learning_rate} ({t.lr_schedule.value}{warmup}), seed {t.seed}",
        f"- Optimizer {t.optimizer.value} (weight decay {t.adam_weight_decay}), "
        f"mixed precision {t.mixed_precision.value}",
    ]
    if t.method is Method.LORA:
        spec = t.lora_or_default()
        lines.append(
            f"- LoRA rank {spec.rank}, alpha {spec.alpha}, dropout {spec.dropout}, "
            f"target modules {', '.join(spec.target_modules)}"
        )
    if t.train_text_encoder:
        steps = f"the first {t.text_encoder_steps} steps" if t.text_encoder_steps else "all steps"
        lines.append(
            f"- Text encoder trained for {steps}, learning rate {t.text_encoder_learning_rate or t.learning_rate}"
        )
    else:
        lines.append("- Text encoder frozen")
    if t.snr_gamma is not None:
        lines.append(f"- Min-SNR loss weighting, gamma {t.snr_gamma}")
    if t.offset_noise > 0:
        lines.append(f"- Offset noise {t.offset_noise}")
    return lines


def usage_snippet(config: JobConfig) -> list[str]:
    """Python that loads what was exported: the diffusers folder, else the single file, else base model + LoRA."""
    formats = set(config.output.formats)
    base = config.base_model.id or (
        f"<download of {config.base_model.uri}>" if config.base_model.uri else "<the base model folder>"
    )
    lora = [
        'pipe = StableDiffusionPipeline.from_pretrained("' + base + '")',
        'pipe.load_lora_weights("<download of lora/>")',
    ]
    lines = ["from diffusers import StableDiffusionPipeline", ""]
    if ExportFormat.DIFFUSERS in formats:
        lines.append('pipe = StableDiffusionPipeline.from_pretrained("<download of model/>")')
    elif ExportFormat.SAFETENSORS in formats:
        lines.append('pipe = StableDiffusionPipeline.from_single_file("<download of model.safetensors>")')
    else:
        lines += lora
    if ExportFormat.LORA in formats and formats & {ExportFormat.DIFFUSERS, ExportFormat.SAFETENSORS}:
        lines += ["# or the base model plus the adapters:", *(f"# {line}" for line in lora)]
    return [*lines, f'image = pipe("{config.instance_images.prompt}").images[0]']


def model_card(config: JobConfig, steps: int, final_loss: float | None, files: list[str]) -> str:
    """A README.md with YAML front matter (the Hugging Face model-card convention) describing the run."""
    t = config.training
    base = config.base_model.cache_identity()
    front = {
        "base_model": config.base_model.id or config.base_model.uri or "tiny-random-stable-diffusion",
        "library_name": "diffusers",
        "tags": ["stable-diffusion", "text-to-image", "dreambooth", *(["lora"] if t.method is Method.LORA else [])],
        "instance_prompt": config.instance_images.prompt,
    }
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", ""]
    lines += [
        f"# DreamBooth: {config.name}",
        "",
        f"Fine-tuned from `{base}` with DreamBooth ({t.method.value}) for {steps} steps.",
        "",
        f"- Instance prompt: `{config.instance_images.prompt}`",
    ]
    if config.prior_preservation.enabled:
        lines.append(
            f"- Prior preservation: `{config.prior_preservation.class_prompt}`, "
            f"{config.prior_preservation.num_images} class images, weight {config.prior_preservation.loss_weight}"
        )
    lines += [
        *training_settings(config),
        f"- Final loss: {final_loss:.5f}" if final_loss is not None else "- Final loss: n/a",
        f"- Exported dtype: {config.output.dtype.value}",
        "",
        "## Files",
        "",
        *(f"- `{f}`" for f in files),
        "",
        "## Use",
        "",
        "```python",
        *usage_snippet(config),
        "```",
        "",
    ]
    return "\n".join(lines)

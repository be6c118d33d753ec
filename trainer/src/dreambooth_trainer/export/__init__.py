"""Export the trained model: a diffusers folder, a single-file checkpoint, LoRA weights, and a model card.

Layout under `output.uri` (docs/contracts.md): `model/` (diffusers, safetensors), `model.safetensors` (the original
Stable Diffusion key layout, for `StableDiffusionPipeline.from_single_file`), `lora/pytorch_lora_weights.safetensors`
(for `pipe.load_lora_weights`), `README.md`.

With LoRA training the diffusers folder and the single file hold the base weights with the adapters merged in.
Merging happens in fp32: when mixed precision stored the frozen weights in fp16/bf16, the base model's fp32 weights
are reloaded from its folder first, and only the result is cast to `output.dtype`. The diffusers folder keeps the
base model's own sampling scheduler (class and config).

Loading the single file: diffusers infers SD 1.x/2.x configs from the weights for real models. For models whose
architecture is not a standard one (the tiny test model), pass the exported diffusers folder as the config:
`StableDiffusionPipeline.from_single_file("model.safetensors", config="<model folder>")`.

- `merge.py`: the exported modules (adapters merged, fp32 base weights).
- `ldm.py`: the key-layout conversion diffusers -> original Stable Diffusion.
- `card.py`: the model card (README.md).
- `writers.py`: each format's writer, and `export_model`, which writes what `output.formats` asks for.
"""

from __future__ import annotations

from dreambooth_trainer.export.card import model_card, training_settings, usage_snippet
from dreambooth_trainer.export.ldm import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from dreambooth_trainer.export.merge import ExportParts, export_parts, merged_text_encoder, merged_unet
from dreambooth_trainer.export.writers import (
    DTYPES,
    LORA_WEIGHT_NAME,
    ExportResult,
    export_model,
    export_scheduler,
    scheduler_class_name,
    write_diffusers,
    write_lora,
    write_single_file,
)

__all__ = [
    "DTYPES",
    "LORA_WEIGHT_NAME",
    "ExportParts",
    "ExportResult",
    "export_model",
    "export_parts",
    "export_scheduler",
    "merged_text_encoder",
    "merged_unet",
    "model_card",
    "scheduler_class_name",
    "text_encoder_to_ldm",
    "training_settings",
    "unet_to_ldm",
    "usage_snippet",
    "vae_to_ldm",
    "write_diffusers",
    "write_lora",
    "write_single_file",
]

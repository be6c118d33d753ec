"""The serving benchmark's models: the tiny model, an SD 1.5-sized model with random weights from configs, and
random LoRA subjects of either, written as a LoRA job's export writes them (bench_serve.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_model(cache: Path) -> Path:
    from dreambooth_trainer.tiny import build_tiny_pipeline

    return build_tiny_pipeline(cache / "tiny")


def sd15_model(folder: Path, cache: Path, dry_run: bool = False) -> Path:
    """An SD 1.5-sized diffusers folder with random weights (fp16), the tiny model's tokenizer, DPM-Solver config
    (`dry_run`: the tiny model's sizes, to run the code path on a CPU in seconds)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from bench.bench_gpu_train import SD15_SCHEDULER, SD15_TEXT, SD15_UNET, SD15_VAE
    from dreambooth_trainer import tiny

    unet_config, vae_config, text_config = SD15_UNET, SD15_VAE, SD15_TEXT
    if dry_run:
        unet_config, vae_config = tiny.UNET_CONFIG, tiny.VAE_CONFIG
        text_config = {**tiny.TEXT_CONFIG, "vocab_size": 1000}
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init is far quicker on the GPU
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    for module in (unet, vae, text_encoder):  # keep activations finite in fp16: random weights, small scale
        with torch.no_grad():
            for p in module.parameters():
                if p.dim() > 1:
                    p.mul_(0.5)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tiny_model(cache) / "tokenizer"),
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=torch.float32 if dry_run else torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, unet, vae, text_encoder
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def lora_subjects(model: Path, out: Path, count: int, rank: int) -> dict[str, str]:
    """`count` random LoRA adapters of the model's UNet (rank `rank` on to_q/to_k/to_v/to_out.0), saved with
    `save_lora_weights` as the export does; returns the subjects file's mapping."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    subjects = {}
    unet = None
    for i in range(count):
        folder = out / f"subject-{i}"
        subjects[f"subject-{i}"] = folder.as_uri()
        if (folder / "pytorch_lora_weights.safetensors").is_file():
            continue
        if unet is None:
            unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32)
        name = f"s{i}"
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        unet.add_adapter(config, adapter_name=name)
        unet.set_adapter(name)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, param in unet.named_parameters():
                if f".{name}." in key and "lora_B" in key:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        layers = {k.replace(f".{name}", ""): v for k, v in _adapter_state(unet, name).items()}
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers={k: v.half() for k, v in layers.items()}, safe_serialization=True
        )
        unet.delete_adapters(name)
    return subjects


def _adapter_state(unet: Any, name: str) -> dict[str, Any]:
    """One adapter's layers in diffusers' key names (as `export.writers.lora_state_dicts` converts them)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return dict(convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=name)))

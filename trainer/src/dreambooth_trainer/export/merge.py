"""The modules that are exported: the UNet and text encoder with LoRA adapters merged, in fp32.

When mixed precision stored the frozen weights in fp16/bf16, the base model's fp32 weights are reloaded from its
folder first (the half copies lose most of a small LoRA update when merged), and only the result is cast to
`output.dtype` by the writers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreambooth_trainer.components import load_components_from_dir


def merged_unet(unet: Any) -> Any:
    """A copy of the UNet with LoRA adapters (if any) merged into the base weights and removed."""
    return _fuse_unet(copy.deepcopy(unet))


def _fuse_unet(unet: Any) -> Any:
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()
    return unet


def merged_text_encoder(text_encoder: Any) -> Any:
    return _fuse_text_encoder(copy.deepcopy(text_encoder))


def _fuse_text_encoder(encoder: Any) -> Any:
    if getattr(encoder, "peft_config", None):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(encoder.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = encoder.get_submodule(parent_name) if parent_name else encoder
                setattr(parent, child, module.get_base_layer())
        del encoder.peft_config
        encoder._hf_peft_config_loaded = False
    return encoder


@dataclass
class ExportParts:
    """The merged UNet and text encoder and the VAE that the diffusers folder and the single file are made from."""

    unet: Any
    vae: Any
    text_encoder: Any


def has_half_weights(models: Iterable[Any]) -> bool:
    """Whether any floating-point weight of `models` is stored below fp32 (mixed precision casts the frozen ones)."""
    return any(t.is_floating_point() and t.dtype != torch.float32 for m in models for t in m.state_dict().values())


def base_weight_name(name: str) -> str:
    """The base model's name of a weight inside a PEFT-wrapped layer (`to_q.base_layer.weight` -> `to_q.weight`)."""
    return name.replace(".base_layer.", ".")


def with_fp32_base(model: Any, base_state: Mapping[str, torch.Tensor]) -> Any:
    """An fp32 copy of `model`: trained parameters (requires_grad) as they are, every other floating-point weight
    from `base_state`, the base model's fp32 weights."""
    out = copy.deepcopy(model).float()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, tensor in out.state_dict(keep_vars=True).items():
            if name in trained or not tensor.is_floating_point():
                continue
            source = base_state.get(base_weight_name(name))
            if source is None or source.shape != tensor.shape:
                raise ValueError(
                    f"the base model has no weight {base_weight_name(name)} of shape {tuple(tensor.shape)}"
                )
            tensor.copy_(source)
    return out


def export_parts(module: Any, variant: str | None = None) -> ExportParts:
    """Merge the adapters into fp32 weights; half-precision frozen weights are replaced by the base model's fp32
    ones, reloaded from `module.model_dir` (the half copies lost most of a small LoRA update when merged)."""
    unet, vae, text_encoder = module.unet, module.vae, module.text_encoder
    if not has_half_weights((unet, vae, text_encoder)):
        return ExportParts(merged_unet(unet), copy.deepcopy(vae), merged_text_encoder(text_encoder))
    base = load_components_from_dir(Path(module.model_dir), variant=variant)
    return ExportParts(
        unet=_fuse_unet(with_fp32_base(unet, base.unet.state_dict())),
        vae=with_fp32_base(vae, base.vae.state_dict()),
        text_encoder=_fuse_text_encoder(with_fp32_base(text_encoder, base.text_encoder.state_dict())),
    )

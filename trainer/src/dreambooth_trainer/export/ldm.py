"""Key-layout conversion of state dicts: diffusers -> the original Stable Diffusion (LDM) single-file layout.

`model.safetensors` holds the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and the
text encoder under `cond_stage_model.transformer.` (what `StableDiffusionPipeline.from_single_file` reads).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTN_TO_LDM = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _resnet_suffix(suffix: str) -> str:
    head, _, rest = suffix.partition(".")
    for new, old in _RESNET_TO_LDM:
        if head == new:
            return f"{old}.{rest}"
    return suffix


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to the LDM layout (`model.diffusion_model.` keys)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    per = int(config["layers_per_block"]) + 1
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    patterns: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
        (
            re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet_suffix(m[3])}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
            lambda m: f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
            lambda m: f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}",
        ),
        (
            re.compile(r"mid_block\.resnets\.(\d+)\.(.+)"),
            lambda m: f"middle_block.{2 * int(m[1])}.{_resnet_suffix(m[2])}",
        ),
        (re.compile(r"mid_block\.attentions\.0\.(.+)"), lambda m: f"middle_block.1.{m[1]}"),
        (
            re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet_suffix(m[3])}",
        ),
        (
            re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
            lambda m: f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}",
        ),
        (
            re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"),
            lambda m: f"output_blocks.{int(m[1]) * per + per - 1}.{2 if up_has_attn[int(m[1])] else 1}.conv.{m[2]}",
        ),
    ]
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        for pattern, rename in patterns:
            match = pattern.fullmatch(key)
            if match:
                out[rename(match)] = value
                break
        else:
            raise ValueError(f"no LDM name for UNet weight {key}")
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the LDM layout (`first_stage_model.` keys)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = top.get(key)
        tensor = value
        if new is None:
            new = key
            new = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
            new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
            new = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_up - 1 - int(m[1])}.block.", new)
            new = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_up - 1 - int(m[1])}.upsample.", new)
            new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
            new = new.replace("conv_shortcut", "nin_shortcut")
            if ".mid_block.attentions.0." in new:
                new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
                for diff, ldm in _VAE_ATTN_TO_LDM:
                    new = new.replace(f"attn_1.{diff}", f"attn_1.{ldm}")
                if tensor.ndim == 2:  # LDM attention projections are 1x1 convolutions
                    tensor = tensor[:, :, None, None]
        out[f"first_stage_model.{new}"] = tensor
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x checkpoints keep the Hugging Face CLIP text model keys under `cond_stage_model.transformer.`."""
    return {f"cond_stage_model.transformer.{k}": v for k, v in state.items()}

"""Write every format of `output.formats` and the model card under `output.uri` (docs/contracts.md).

`model/` (diffusers, safetensors, the base model's own sampling scheduler), `model.safetensors` (the LDM key
layout, ldm.py), `lora/pytorch_lora_weights.safetensors` (for `pipe.load_lora_weights`), `README.md` (card.py).
`model/` is uploaded parts first, `model_index.json` last, then its manifest (manifest.py), so that a folder with
`model_index.json` is complete and a damaged one is recognised.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreambooth_api.config import ExportDType, ExportFormat, JobConfig
from dreambooth_trainer.export.card import model_card
from dreambooth_trainer.export.ldm import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from dreambooth_trainer.export.manifest import upload_model_folder
from dreambooth_trainer.export.merge import export_parts
from dreambooth_trainer.storage import ObjectStore, join_uri

DTYPES = {ExportDType.FP32: torch.float32, ExportDType.FP16: torch.float16, ExportDType.BF16: torch.bfloat16}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RESOLUTION_METADATA = "resolution"
"""The single file's safetensors metadata key holding the training resolution (the server's default size)."""


@dataclass
class ExportResult:
    uris: dict[str, str] = field(default_factory=dict)
    """What was written, by format name (diffusers, safetensors, lora, readme)."""
    model_uri: str = ""
    """The primary model URI (the diffusers folder when exported)."""


# Settings of the training noise schedule that the exported sampling scheduler must share with it.
TRAINING_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)
FALLBACK_SCHEDULER = "DDIMScheduler"


def scheduler_class_name(base_class: str | None, config: Mapping[str, Any]) -> str:
    """The exported folder's scheduler class: the base model's own, unless it is unknown or cannot honour the
    training schedule's zero terminal SNR (PNDM has no `rescale_betas_zero_snr`), then DDIM."""
    import diffusers

    cls = getattr(diffusers, base_class, None) if base_class else None
    if cls is None or not hasattr(cls, "from_config"):
        return FALLBACK_SCHEDULER
    params = inspect.signature(cls.__init__).parameters
    if config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in params:
        return FALLBACK_SCHEDULER
    return str(base_class)


def export_scheduler(model_dir: Path | None, training_config: Mapping[str, Any]) -> Any:
    """The base model's sampling scheduler (from `<model_dir>/scheduler/scheduler_config.json`), with the training
    schedule's settings (`TRAINING_SCHEDULE_KEYS`) on top."""
    import diffusers

    path = Path(model_dir) / "scheduler" / "scheduler_config.json" if model_dir is not None else None
    base: dict[str, Any] = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    config = {**base, **{k: training_config[k] for k in TRAINING_SCHEDULE_KEYS if k in training_config}}
    cls = getattr(diffusers, scheduler_class_name(base.get("_class_name"), config))
    return cls.from_config(config)


def lora_state_dicts(unet: Any, text_encoder: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, save_embedding_layers=False))
    text_layers = None
    if getattr(text_encoder, "peft_config", None):
        text_layers = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoder, save_embedding_layers=False)
        )
    return unet_layers, text_layers


def _lora_metadata(model: Any) -> dict[str, Any] | None:
    """The adapter's LoraConfig (so that alpha, not only the rank, survives the round trip)."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    data = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}


def write_diffusers(
    module: Any,
    out_dir: Path,
    dtype: torch.dtype,
    unet: Any | None = None,
    text_encoder: Any | None = None,
    vae: Any | None = None,
) -> Path:
    """Save the trained pipeline as a diffusers folder (safetensors) with the base model's scheduler; returns it."""
    from diffusers import StableDiffusionPipeline

    if unet is None or text_encoder is None or vae is None:
        parts = export_parts(module)
        unet = unet if unet is not None else parts.unet
        text_encoder = text_encoder if text_encoder is not None else parts.text_encoder
        vae = vae if vae is not None else parts.vae
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=module.tokenizer,
        unet=unet,
        scheduler=export_scheduler(getattr(module, "model_dir", None), module.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_single_file(
    unet: Any, vae: Any, text_encoder: Any, path: Path, dtype: torch.dtype, resolution: int | None = None
) -> Path:
    """One safetensors file in the original Stable Diffusion key layout (the training resolution in its metadata)."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    state.update(unet_to_ldm(unet.state_dict(), unet.config))
    state.update(vae_to_ldm(vae.state_dict(), vae.config))
    state.update(text_encoder_to_ldm(text_encoder.state_dict()))
    tensors = {k: v.detach().to(dtype=dtype).contiguous().cpu() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "producer": "dreambooth-trainer"}
    if resolution is not None:
        metadata[RESOLUTION_METADATA] = str(resolution)
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_lora(module: Any, out_dir: Path, dtype: torch.dtype) -> Path:
    """LoRA weights for `pipe.load_lora_weights(<folder>)`; returns the weights file."""
    from diffusers import StableDiffusionPipeline

    unet_layers, text_layers = lora_state_dicts(module.unet, module.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers={k: v.detach().to(dtype) for k, v in unet_layers.items()},
        text_encoder_lora_layers={k: v.detach().to(dtype) for k, v in text_layers.items()} if text_layers else None,
        safe_serialization=True,
        unet_lora_adapter_metadata=_lora_metadata(module.unet),
        text_encoder_lora_adapter_metadata=_lora_metadata(module.text_encoder) if text_layers else None,
    )
    return out_dir / LORA_WEIGHT_NAME


def export_model(
    module: Any,
    config: JobConfig,
    store: ObjectStore,
    workdir: Path,
    *,
    steps: int,
    final_loss: float | None = None,
) -> ExportResult:
    """Write every format in `output.formats` plus README.md under `output.uri`; returns their URIs."""
    dtype = DTYPES[config.output.dtype]
    out_uri = config.output.uri.rstrip("/")
    workdir = Path(workdir)
    result = ExportResult()
    formats = set(config.output.formats)
    files: list[str] = []
    parts = None
    if formats & {ExportFormat.DIFFUSERS, ExportFormat.SAFETENSORS}:
        parts = export_parts(module, config.base_model.variant)
    if ExportFormat.DIFFUSERS in formats:
        assert parts is not None
        local = write_diffusers(
            module, workdir / "model", dtype, unet=parts.unet, text_encoder=parts.text_encoder, vae=parts.vae
        )
        uri = join_uri(out_uri, "model")
        upload_model_folder(store, local, uri, config.training.resolution)
        result.uris["diffusers"] = uri
        files.append("model/")
    if ExportFormat.SAFETENSORS in formats:
        assert parts is not None
        local_file = write_single_file(
            parts.unet, parts.vae, parts.text_encoder, workdir / "model.safetensors", dtype, config.training.resolution
        )
        uri = join_uri(out_uri, "model.safetensors")
        store.upload_file(local_file, uri)
        result.uris["safetensors"] = uri
        files.append("model.safetensors")
    if ExportFormat.LORA in formats:
        local_file = write_lora(module, workdir / "lora", dtype)
        uri = join_uri(out_uri, "lora", LORA_WEIGHT_NAME)
        store.upload_file(local_file, uri)
        result.uris["lora"] = uri
        files.append(f"lora/{LORA_WEIGHT_NAME}")
    readme = join_uri(out_uri, "README.md")
    store.write_bytes(readme, model_card(config, steps, final_loss, files).encode())
    result.uris["readme"] = readme
    result.model_uri = result.uris.get("diffusers") or result.uris.get("safetensors") or result.uris.get("lora", "")
    return result

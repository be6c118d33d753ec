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
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreambooth_api.config import ExportDType, ExportFormat, JobConfig, Method
from dreambooth_trainer.storage import ObjectStore, join_uri

DTYPES = {ExportDType.FP32: torch.float32, ExportDType.FP16: torch.float16, ExportDType.BF16: torch.bfloat16}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

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


@dataclass
class ExportResult:
    uris: dict[str, str] = field(default_factory=dict)
    """What was written, by format name (diffusers, safetensors, lora, readme)."""
    model_uri: str = ""
    """The primary model URI (the diffusers folder when exported)."""


# ----- key-layout conversion: diffusers -> original Stable Diffusion (LDM) --------------------------------------------
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


# ----- building the exported modules ---------------------------------------------------------------------------------
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
    from dreambooth_trainer.components import load_components_from_dir

    base = load_components_from_dir(Path(module.model_dir), variant=variant)
    return ExportParts(
        unet=_fuse_unet(with_fp32_base(unet, base.unet.state_dict())),
        vae=with_fp32_base(vae, base.vae.state_dict()),
        text_encoder=_fuse_text_encoder(with_fp32_base(text_encoder, base.text_encoder.state_dict())),
    )


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


def write_single_file(unet: Any, vae: Any, text_encoder: Any, path: Path, dtype: torch.dtype) -> Path:
    """One safetensors file in the original Stable Diffusion key layout."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    state.update(unet_to_ldm(unet.state_dict(), unet.config))
    state.update(vae_to_ldm(vae.state_dict(), vae.config))
    state.update(text_encoder_to_ldm(text_encoder.state_dict()))
    tensors = {k: v.detach().to(dtype=dtype).contiguous().cpu() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "producer": "dreambooth-trainer"})
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
        store.upload_dir(local, uri)
        result.uris["diffusers"] = uri
        files.append("model/")
    if ExportFormat.SAFETENSORS in formats:
        assert parts is not None
        local_file = write_single_file(parts.unet, parts.vae, parts.text_encoder, workdir / "model.safetensors", dtype)
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

"""Tiny random DINO and CLIP models built from configs (no hub download), for tests and demos.

They have the real architectures (transformers' ViTModel and CLIPModel) at toy sizes, and the real models'
preprocessing: the image processors below are configured as the `preprocessor_config.json` of facebook/dino-vits16
(resize to 224 x 224, bilinear, ImageNet mean and std) and of openai/clip-vit-base-patch32 (shorter side to 224,
bicubic, centre crop 224, CLIP's mean and std), so that the code path from PIL image to embedding is the one real
models take. The CLIP tokenizer is the tiny Stable Diffusion model's (`dreambooth_trainer.tiny`).

`build_tiny_metric_model(kind, cache_root)` writes a transformers folder under `cache_root/tiny-<kind>-<hash>` once
and returns its path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from dreambooth_trainer import tiny as tiny_sd

MetricKind = Literal["dino", "clip"]

COMPLETE_MARKER = ".complete"
TINY_METRIC_FORMAT_VERSION = 1
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BILINEAR = 2  # PIL.Image.Resampling values, as preprocessor configs store them
BICUBIC = 3

DINO_PREPROCESSING: dict[str, Any] = {
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": BILINEAR,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
}
CLIP_PREPROCESSING: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": BICUBIC,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "do_convert_rgb": True,
}
VISION: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 32,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
CLIP_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": tiny_sd.MODEL_MAX_LENGTH,
}
PROJECTION_DIM = 16


def _configs(kind: MetricKind, seed: int) -> dict[str, Any]:
    if kind == "dino":
        return {"version": TINY_METRIC_FORMAT_VERSION, "seed": seed, "vision": VISION, "pre": DINO_PREPROCESSING}
    return {
        "version": TINY_METRIC_FORMAT_VERSION,
        "seed": seed,
        "vision": VISION,
        "text": CLIP_TEXT,
        "projection": PROJECTION_DIM,
        "pre": CLIP_PREPROCESSING,
        "tokenizer": tiny_sd.tiny_config_hash(),
    }


def build_tiny_metric_model(kind: MetricKind, cache_root: Path, seed: int = 0) -> Path:
    """Build (or reuse) the tiny `kind` model under `cache_root` and return its transformers folder."""
    digest = hashlib.sha256(json.dumps(_configs(kind, seed), sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_root)
    target = root / f"tiny-{kind}-{digest}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{kind}-", dir=root))
    try:
        (_write_dino if kind == "dino" else _write_clip)(tmp, seed)
        (tmp / COMPLETE_MARKER).write_text(digest)
        try:
            tmp.replace(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():  # another process finished first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _seeded(seed: int) -> Any:
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    return state


def _write_dino(out: Path, seed: int) -> None:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    state = _seeded(seed)
    try:
        model = ViTModel(ViTConfig(**VISION))
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(**DINO_PREPROCESSING).save_pretrained(out)


def _write_clip(out: Path, seed: int) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges = tiny_sd.tokenizer_files()
    src = out / ".tokenizer-src"
    src.mkdir(parents=True)
    (src / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (src / "merges.txt").write_text("#version: tiny\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=tiny_sd.MODEL_MAX_LENGTH
    )
    text_config = {
        **CLIP_TEXT,
        "vocab_size": len(vocab),
        "bos_token_id": vocab[tiny_sd.BOS],
        "eos_token_id": vocab[tiny_sd.EOS],
        "pad_token_id": vocab[tiny_sd.EOS],
    }
    state = _seeded(seed)
    try:
        model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=VISION, projection_dim=PROJECTION_DIM))
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(out, safe_serialization=True)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(**CLIP_PREPROCESSING), tokenizer=tokenizer)
    processor.save_pretrained(out)
    shutil.rmtree(src)

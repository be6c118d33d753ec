"""A tiny, deterministic, random Stable Diffusion pipeline built from configs (no hub download).

It has the real SD 1.x architecture (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDPMScheduler) at toy sizes, so that the whole trainer runs on CPU in tests and demos. The UNet and
text encoder are random; the VAE is a hand-set 2x colour codec (`tiny_vae`), so that what the UNet learns shows in
decoded samples. The noise schedule is SD 1.x's scaled-linear betas rescaled to zero terminal SNR, with v-prediction
and trailing timesteps (as in SD 2.x fine-tunes): a UNet trained from scratch for a few hundred steps then samples the
right colours and brightness, where epsilon prediction on the plain schedule drifts dark.

The tokenizer's vocabulary and BPE merges are written here: every byte-level character, and merges for a small word
list, so common prompt words become single tokens.

`build_tiny_pipeline(cache_root)` writes a diffusers folder under `cache_root/tiny-sd-<hash>` (the hash covers every
config below and the seed) and returns its path; later calls with the same configs return the cached folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dreambooth_trainer.tiny_vae import set_codec_weights, vae_config

# Bump when the way the folder is built changes (so old caches are not reused).
TINY_FORMAT_VERSION = 2
# Resolution in pixels that the tiny model samples at by default (UNet sample size x VAE scale factor).
TINY_RESOLUTION = 32
MODEL_MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
COMPLETE_MARKER = ".complete"

UNET_CONFIG: dict[str, Any] = {
    "sample_size": TINY_RESOLUTION // 2,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
VAE_CONFIG: dict[str, Any] = vae_config(TINY_RESOLUTION)
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}
# Words that become single tokens (everything else is spelled out in byte-level characters).
WORDS = tuple(
    "a an the of in on at with and photo picture portrait painting drawing sks zwx dog cat person man "  # noqa: SIM905 - a word list reads better as one string
    "woman toy car house tree red blue green black white sitting standing beach park city style close up".split()
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level mapping: every byte to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def tokenizer_files(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """The vocabulary and BPE merges of the tiny CLIP tokenizer."""
    base = list(_bytes_to_unicode().values())
    vocab_tokens = base + [c + "</w>" for c in base]
    merges: list[str] = []
    seen = set(vocab_tokens)
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        current = symbols[0]
        for nxt in symbols[1:]:
            merge = f"{current} {nxt}"
            current += nxt
            if current not in seen:
                merges.append(merge)
                vocab_tokens.append(current)
                seen.add(current)
    vocab_tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_tokens)}, merges


def tiny_configs(seed: int = 0) -> dict[str, Any]:
    vocab, merges = tokenizer_files()
    return {
        "version": TINY_FORMAT_VERSION,
        "seed": seed,
        "unet": UNET_CONFIG,
        "vae": VAE_CONFIG,
        "text": TEXT_CONFIG,
        "scheduler": SCHEDULER_CONFIG,
        "vocab_size": len(vocab),
        "merges": len(merges),
    }


def tiny_config_hash(seed: int = 0) -> str:
    blob = json.dumps(tiny_configs(seed), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_tiny_pipeline(path: Path, seed: int = 0) -> Path:
    """Build (or reuse) the tiny pipeline under `path` (a cache folder) and return the diffusers folder's path."""
    path = Path(path)
    target = path / f"tiny-sd-{tiny_config_hash(seed)}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=path))
    try:
        _write_pipeline(tmp, seed)
        (tmp / COMPLETE_MARKER).write_text(tiny_config_hash(seed))
        try:
            tmp.replace(target)
        except OSError:
            # Another process finished first (the target exists and is not empty): use theirs.
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_pipeline(out: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = tokenizer_files()
    tok_dir = out / ".tokenizer-src"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: tiny\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=MODEL_MAX_LENGTH
    )

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
        set_codec_weights(vae)
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            **TEXT_CONFIG,
            vocab_size=len(vocab),
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
        text_encoder = CLIPTextModel(text_config)
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tok_dir)

"""Which files of a diffusers folder training needs: configs, the tokenizer, and one copy of each part's weights.

Published Stable Diffusion repositories carry each part's weights several times: `stable-diffusion-v1-5` has the
UNet as full, fp16 and non-EMA safetensors and again as `.bin`, about 9.8 GB for the training parts where 4.3 GB
is needed. Downloading only the weights of the requested variant (fp32 when none is given) as safetensors cuts the
time from apply to training start for every job that does not find the model cached.

`select_files` makes the choice on a listing (a hub repository's files or an object-storage folder), and falls back
to a part's `.bin` weights when it has no safetensors. `hub_allow_patterns` turns it into the `allow_patterns` of
`huggingface_hub.snapshot_download`; `hub_patterns` (safetensors only) is the fallback when the hub cannot be listed
(offline, reading a pre-filled cache).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

# The diffusers subfolders training reads (safety checker and feature extractor are never needed).
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Weight file stems: diffusers models, and transformers models (the text encoder).
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
TOP_LEVEL = ("model_index.json",)
# diffusers and transformers name shards stem-00001-of-00003[.variant].ext
SHARD = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"


def _weight_patterns(part: str, variant: str | None, extension: str) -> list[str]:
    tag = f".{variant}" if variant else ""
    patterns = []
    for stem in WEIGHT_STEMS:
        patterns.append(f"{part}/{stem}{tag}.{extension}")
        patterns.append(f"{part}/{stem}{SHARD}{tag}.{extension}")
        patterns.append(f"{part}/{stem}.{extension}.index{tag}.json")
    return patterns


def _config_patterns(part: str) -> list[str]:
    return [f"{part}/*.json", f"{part}/*.txt", f"{part}/*.model"]


def _is_weights_index(path: str) -> bool:
    return ".index" in path.rsplit("/", 1)[-1]


def hub_patterns(variant: str | None) -> list[str]:
    """`allow_patterns` that fetch the configs and the variant's safetensors weights of every required part."""
    patterns = list(TOP_LEVEL)
    for part in REQUIRED_PARTS:
        patterns += _config_patterns(part) + _weight_patterns(part, variant, "safetensors")
    return patterns


def select_files(paths: Iterable[str], variant: str | None) -> list[str]:
    """The relative paths (from a listing of a diffusers folder) that training needs, in listing order."""
    listing = list(paths)

    def matching(patterns: list[str]) -> list[str]:
        return [p for p in listing if any(fnmatchcase(p, pat) for pat in patterns)]

    chosen = set(matching(list(TOP_LEVEL)))
    for part in REQUIRED_PARTS:
        configs = {p for p in matching(_config_patterns(part)) if not _is_weights_index(p)}
        weights = matching(_weight_patterns(part, variant, "safetensors")) or matching(
            _weight_patterns(part, variant, "bin")
        )
        chosen |= configs | set(weights)
    return [p for p in listing if p in chosen]


def hub_allow_patterns(listing: Iterable[str] | None, variant: str | None) -> list[str]:
    """`allow_patterns` for a hub repository: the selected files of its listing, or `hub_patterns` without one."""
    if listing is None:
        return hub_patterns(variant)
    return select_files(listing, variant)

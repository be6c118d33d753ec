"""Which files of a published diffusers repository the trainer downloads (model_files.py)."""

from __future__ import annotations

import pytest
from huggingface_hub.utils import filter_repo_objects

from dreambooth_trainer.model_files import hub_allow_patterns, hub_patterns, select_files

# The file list of stable-diffusion-v1-5/stable-diffusion-v1-5 (sizes in the comments).
SD15 = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned-emaonly.ckpt",  # 4.3 GB
    "v1-5-pruned-emaonly.safetensors",  # 4.3 GB
    "v1-5-pruned.safetensors",  # 7.7 GB
    "v1-inference.yaml",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",  # 492 MB
    "text_encoder/model.fp16.safetensors",  # 246 MB
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",  # 3.4 GB
    "unet/diffusion_pytorch_model.fp16.safetensors",  # 1.7 GB
    "unet/diffusion_pytorch_model.non_ema.safetensors",  # 3.4 GB
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",  # 335 MB
    "vae/diffusion_pytorch_model.fp16.safetensors",  # 167 MB
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
]
CONFIGS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
]


@pytest.mark.parametrize(
    ("variant", "weights"),
    [
        (
            None,
            [
                "text_encoder/model.safetensors",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors",
            ],
        ),
        (
            "fp16",
            [
                "text_encoder/model.fp16.safetensors",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/diffusion_pytorch_model.fp16.safetensors",
            ],
        ),
    ],
)
def test_one_copy_of_each_parts_weights_and_the_configs(variant: str | None, weights: list[str]) -> None:
    expected = sorted(CONFIGS + weights)
    assert sorted(select_files(SD15, variant)) == expected
    # huggingface_hub's own matcher (what snapshot_download applies) picks the same files from the repository
    assert sorted(filter_repo_objects(SD15, allow_patterns=hub_patterns(variant))) == expected


def test_sharded_weights_and_their_index_follow_the_variant() -> None:
    listing = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.fp16.safetensors",
    ]
    for variant, tag in ((None, ""), ("fp16", ".fp16")):
        unet = {p for p in select_files(listing, variant) if p.startswith("unet/") and p != "unet/config.json"}
        assert unet == {
            f"unet/diffusion_pytorch_model.safetensors.index{tag}.json",
            f"unet/diffusion_pytorch_model-00001-of-00002{tag}.safetensors",
            f"unet/diffusion_pytorch_model-00002-of-00002{tag}.safetensors",
        }
        assert set(filter_repo_objects(listing, allow_patterns=hub_patterns(variant))) >= unet


def test_a_part_without_safetensors_falls_back_to_its_bin_weights_in_a_listing() -> None:
    listing = ["vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin"]
    assert select_files(listing, None) == ["vae/config.json", "vae/diffusion_pytorch_model.bin"]
    assert select_files(listing, "fp16") == ["vae/config.json", "vae/diffusion_pytorch_model.fp16.bin"]


BIN_ONLY = [name for name in SD15 if not name.endswith(".safetensors")]


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_hub_allow_patterns_follow_the_listing(variant: str | None) -> None:
    """A hub repository that has only .bin weights downloads them (the same rule as object storage)."""
    tag = f".{variant}" if variant else ""
    chosen = filter_repo_objects(BIN_ONLY, allow_patterns=hub_allow_patterns(BIN_ONLY, variant))
    weights = [f"text_encoder/pytorch_model{tag}.bin", f"unet/diffusion_pytorch_model{tag}.bin"]
    assert sorted(chosen) == sorted([*CONFIGS, *weights, f"vae/diffusion_pytorch_model{tag}.bin"])
    # with safetensors in the repository the listing picks exactly what the static patterns pick
    full = filter_repo_objects(SD15, allow_patterns=hub_allow_patterns(SD15, variant))
    assert sorted(full) == sorted(filter_repo_objects(SD15, allow_patterns=hub_patterns(variant)))


def test_hub_allow_patterns_without_a_listing_are_the_static_patterns() -> None:
    assert hub_allow_patterns(None, "fp16") == hub_patterns("fp16")

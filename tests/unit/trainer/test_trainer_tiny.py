"""The tiny random Stable Diffusion pipeline: loads with diffusers, generates, is deterministic and cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from dreambooth_trainer.tiny import TINY_RESOLUTION, build_tiny_pipeline, tiny_config_hash


def test_builds_loads_and_generates(tmp_path: Path) -> None:
    folder = build_tiny_pipeline(tmp_path)
    assert folder.parent == tmp_path
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None
    ids = pipe.tokenizer("a photo of sks dog").input_ids
    # the identifier and the prompt words are single tokens, between BOS and EOS
    assert len(ids) == 7
    assert ids[0] == pipe.tokenizer.bos_token_id
    assert ids[-1] == pipe.tokenizer.eos_token_id
    out = pipe(
        "a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert out.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(out).all()


def test_deterministic_and_cached(tmp_path: Path) -> None:
    a = build_tiny_pipeline(tmp_path / "a", seed=3)
    stamp = (a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert build_tiny_pipeline(tmp_path / "a", seed=3) == a
    assert (a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    b = build_tiny_pipeline(tmp_path / "b", seed=3)
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert tiny_config_hash(3) != tiny_config_hash(4)
    c = build_tiny_pipeline(tmp_path / "a", seed=4)
    wc = load_file(c / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)

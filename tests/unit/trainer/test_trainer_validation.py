"""Validation samples: fixed-seed images from the current weights, written to storage and TensorBoard."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dreambooth_api.config import BaseModelSpec, JobConfig, TrainingConfig, ValidationSpec
from dreambooth_trainer.components import load_components
from dreambooth_trainer.module import DreamBoothModule
from dreambooth_trainer.storage import ObjectStore
from dreambooth_trainer.validation import run_validation, sample_and_upload, validation_autocast_dtype

# The tiny model is cached by config hash, so test files share one build.
SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"


def test_samples_are_written_reproducible_and_follow_the_weights(tmp_path: Path) -> None:
    store = ObjectStore()
    comps = load_components(BaseModelSpec(tiny=True), store, SHARED_MODELS)
    module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32))
    spec = ValidationSpec(prompts=["a photo of sks dog", "sks dog on the beach"], num_images=2, steps=2)
    out = (tmp_path / "out").as_uri()
    tb = tmp_path / "tb"

    first = run_validation(module, spec, 100, 32, store, out, tensorboard_dir=tb)
    names = sorted(p.name for p in (tmp_path / "out" / "samples" / "step-00000100").iterdir())
    assert names == ["p0-i0.png", "p0-i1.png", "p1-i0.png", "p1-i1.png"]
    assert len(first.uris) == 4
    assert first.images[0][0].size == (32, 32)
    assert module.unet.training  # the train mode is restored

    again = run_validation(module, spec, 200, 32, store, out)
    assert np.array_equal(np.asarray(first.images[1][1]), np.asarray(again.images[1][1]))

    with torch.no_grad():
        for name, param in module.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    changed = run_validation(module, spec, 300, 32, store, out)
    assert not np.array_equal(np.asarray(first.images[0][0]), np.asarray(changed.images[0][0]))

    events = EventAccumulator(str(tb), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"validation/p0", "validation/p1"}
    assert [e.step for e in events.Images("validation/p0")] == [100]  # one grid of both images


def test_no_prompts_no_samples(tmp_path: Path) -> None:
    store = ObjectStore()
    comps = load_components(BaseModelSpec(tiny=True), store, SHARED_MODELS)
    module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32))
    result = run_validation(module, ValidationSpec(), 5, 32, store, (tmp_path / "o").as_uri())
    assert result.uris == []
    assert not (tmp_path / "o").exists()


def test_full_fine_tune_with_half_frozen_parts_samples(tmp_path: Path) -> None:
    """Mixed precision on CUDA stores the frozen VAE and text encoder in bf16 while a full fine-tune keeps the UNet
    in fp32: validation must sample under autocast (CPU autocast supports bf16, so this runs here)."""
    store = ObjectStore()
    comps = load_components(BaseModelSpec(tiny=True), store, SHARED_MODELS)
    config = JobConfig.model_validate(
        {
            "name": "validation-test",
            "instanceImages": {"uri": "file:///unused", "prompt": "a photo of sks dog"},
            "training": {
                "method": "full",
                "resolution": 32,
                "validation": {"prompts": ["a photo of sks dog"], "steps": 2, "numImages": 1},
            },
            "output": {"uri": (tmp_path / "out").as_uri()},
        }
    )
    module = DreamBoothModule(comps, config.training)
    module.cast_frozen(torch.bfloat16)  # what builder.build_training does for mixedPrecision bf16 on CUDA
    assert {p.dtype for p in module.unet.parameters()} == {torch.float32}
    assert next(module.vae.parameters()).dtype == torch.bfloat16

    uris = sample_and_upload(config, module, store, 4)

    assert uris == [(tmp_path / "out" / "samples" / "step-00000004" / "p0-i0.png").as_uri()]
    assert (tmp_path / "out" / "samples" / "step-00000004" / "p0-i0.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ((torch.float32, torch.float32, torch.float32), None),
        ((torch.float32, torch.float16, torch.float16), torch.float16),
        ((torch.float32, torch.bfloat16, torch.float32), torch.bfloat16),
        ((torch.bfloat16, torch.float16, torch.float32), torch.bfloat16),
    ],
)
def test_validation_autocast_dtype_follows_any_half_part(
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype], expected: torch.dtype | None
) -> None:
    unet, vae, text = (torch.nn.Linear(2, 2).to(dtype=d) for d in dtypes)
    assert validation_autocast_dtype(SimpleNamespace(unet=unet, vae=vae, text_encoder=text)) == expected

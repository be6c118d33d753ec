"""training.compileUnet: the toolchain check and compile-cache placement (pure), and a real inductor compile of the
tiny UNet on the CPU: the compiled loss equals the eager one, training steps update the weights, and the state dict
keeps the UNet's own keys (checkpoints and exports are unchanged).

The compile's cache is the trainer's own placement under a model cache that outlives the run (COMPILE_CACHE, beside
the test binaries), as a pod's shared model cache volume outlives the pod: the first run compiles (about 90 s on the
2-core VM), later runs of the same checkout load the kernels from it (about 15 s), which is the path the cache is for
(inductor's key includes the source files' paths: a checkout in another folder compiles again)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_api.config import BaseModelSpec, TrainingConfig
from dreambooth_api.env import MODEL_CACHE_DIR as MODEL_CACHE_ENV
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer import compilation
from dreambooth_trainer.components import load_components
from dreambooth_trainer.data import DreamBoothDataset, Example, collate_fn
from dreambooth_trainer.module import DreamBoothModule
from dreambooth_trainer.storage import ObjectStore

SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"
COMPILE_CACHE = Path(os.environ.get("DBO_CACHE_DIR") or Path.home() / ".cache" / "dreambooth-operator") / "model-cache"


def test_compile_caches_go_to_the_shared_model_cache_unless_set() -> None:
    assert compilation.cache_env({}) == {}
    shared = {MODEL_CACHE_ENV: "/cache"}
    assert compilation.cache_env(shared) == {
        "TORCHINDUCTOR_CACHE_DIR": "/cache/torch-compile/inductor",
        "TRITON_CACHE_DIR": "/cache/torch-compile/triton",
    }
    assert compilation.cache_env({**shared, "TRITON_CACHE_DIR": "/mine"}) == {
        "TORCHINDUCTOR_CACHE_DIR": "/cache/torch-compile/inductor"
    }


@pytest.mark.parametrize("cuda", [True, False])
def test_a_missing_compiler_is_invalid_input_named_up_front(tmp_path: Path, cuda: bool) -> None:
    env = {"PATH": str(tmp_path), MODEL_CACHE_ENV: "/cache"}
    with pytest.raises(InvalidInputError, match=r"compileUnet needs a compiler.*no C.* compiler"):
        compilation.prepare(cuda, env)
    assert "TORCHINDUCTOR_CACHE_DIR" not in env
    # With one on PATH the caches are placed.
    tool = tmp_path / ("cc" if cuda else "g++")
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    compilation.prepare(cuda, env)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/cache/torch-compile/inductor"


def _module(compile_unet: bool) -> DreamBoothModule:
    components = load_components(BaseModelSpec(tiny=True), ObjectStore(), SHARED_MODELS)
    torch.manual_seed(0)  # the same LoRA initialisation for both modules
    config = TrainingConfig(method="lora", resolution=32, learning_rate=1e-2, compile_unet=compile_unet)
    return DreamBoothModule(components, config)


def _batch(module: DreamBoothModule) -> dict[str, Any]:
    pixels = np.full((32, 32, 3), 128, np.uint8)
    pixels[8:24, 8:24] = (255, 0, 0)
    example = Example("i", Image.fromarray(pixels), "a photo of sks dog")
    dataset = DreamBoothDataset([example], module.tokenizer, 32)
    dataset.cache_latents(module.vae)
    dataset.cache_text_embeddings(module.text_encoder)
    return collate_fn([dataset[0]] * 2)


def test_compiled_unet_matches_eager_and_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    placed = {MODEL_CACHE_ENV: str(COMPILE_CACHE), "PATH": os.environ.get("PATH", "")}
    compilation.prepare(False, placed)
    for key in (compilation.INDUCTOR_CACHE_ENV, compilation.TRITON_CACHE_ENV):
        monkeypatch.setenv(key, placed[key])  # what the trainer does to os.environ, undone after the test
    torch._dynamo.reset()
    counters.clear()

    eager, compiled = _module(False), _module(True)
    batch = _batch(eager)
    expected = float(eager.compute_loss(batch, torch.Generator().manual_seed(1)))
    got = compiled.compute_loss(batch, torch.Generator().manual_seed(1))
    assert math.isclose(float(got), expected, rel_tol=1e-4, abs_tol=1e-5), (float(got), expected)
    assert counters["stats"]["unique_graphs"] + counters["frames"]["ok"] >= 1, {k: dict(v) for k, v in counters.items()}
    # The compiled graph was looked up in (and, the first time, written to) the cache placed on the shared volume.
    assert cache_dir() == str(COMPILE_CACHE / "torch-compile" / "inductor")
    looked_up = counters["inductor"]["fxgraph_cache_hit"] + counters["inductor"]["fxgraph_cache_miss"]
    assert looked_up >= 1, dict(counters["inductor"])
    assert any((COMPILE_CACHE / "torch-compile" / "inductor").rglob("*.py"))

    before = {k: v.clone() for k, v in compiled.trainable_state_dict().items()}
    optimizer = compiled.configure_optimizers()["optimizer"]
    got.backward()
    optimizer.step()
    optimizer.zero_grad()
    loss = compiled.compute_loss(batch, torch.Generator().manual_seed(2))
    loss.backward()
    optimizer.step()
    after = compiled.trainable_state_dict()
    assert math.isfinite(float(loss))
    assert before.keys() == after.keys() == eager.trainable_state_dict().keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("unet."))
    assert compiled.state_dict().keys() == eager.state_dict().keys()

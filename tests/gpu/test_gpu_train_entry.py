"""A whole `dreambooth-train --local` run on CUDA through the trainer's Python entry (`cli.main`): class priors are
generated on the GPU, training runs in bf16 with LoRA, validation samples are drawn, and every export format is
written to file:// storage; the exported diffusers folder then samples on the GPU."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

MAX_STEPS = 6


def test_dreambooth_train_runs_on_cuda_and_exports(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    device: torch.device,
    config_factory: Any,
    components_factory: Any,
) -> None:
    from dreambooth_trainer import cli

    config = config_factory(
        tmp_path,
        method="lora",
        learningRate=1e-3,
        mixedPrecision="bf16",
        maxSteps=MAX_STEPS,
        checkpoint={"intervalSteps": 3, "intervalSeconds": None, "keep": 2},
        validation={"prompts": ["a photo of sks dog"], "intervalSteps": MAX_STEPS, "steps": 2, "numImages": 1},
    ).to_wire()
    config["priorPreservation"] = {
        "enabled": True,
        "classPrompt": "a photo of dog",
        "numImages": 2,
        "steps": 2,
        "cacheUri": (tmp_path / "class-cache").as_uri(),
    }
    config["output"]["formats"] = ["diffusers", "safetensors", "lora"]
    config_path = tmp_path / "job.json"
    config_path.write_text(json.dumps(config))
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(termination))
    monkeypatch.setenv("DREAMBOOTH_METRICS_PORT", "0")
    monkeypatch.delenv("DREAMBOOTH_CONFIG", raising=False)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    code = cli.main(["--config", str(config_path), "--local", "--workdir", str(tmp_path / "work")])

    doc = json.loads(termination.read_text())
    assert code == 0, doc
    assert doc["status"] == "succeeded", doc
    assert doc["steps"] == MAX_STEPS
    assert math.isfinite(doc["finalLoss"])
    out = tmp_path / "out"
    assert doc["modelUri"].startswith(out.as_uri())
    assert json.loads((out / "result.json").read_text())["status"] == "succeeded"
    for rel in (
        "model/model_index.json",
        "model/unet/config.json",
        "model.safetensors",
        "lora/pytorch_lora_weights.safetensors",
        "README.md",
        "config.json",
        f"samples/step-{MAX_STEPS:08d}/p0-i0.png",
        "checkpoints/step-00000003/manifest.json",
        f"checkpoints/step-{MAX_STEPS:08d}/manifest.json",
    ):
        assert (out / rel).is_file(), rel
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, MAX_STEPS + 1))
    assert len(list((tmp_path / "class-cache").rglob("class-*.png"))) == 2
    # The work really ran on the GPU.
    assert torch.cuda.max_memory_allocated(device) - resident > 2**20

    # bf16 training stored the frozen weights in bf16; the export starts again from the base model's fp32 weights.
    from safetensors.torch import load_file

    base_vae = components_factory().vae.state_dict()
    exported_vae = load_file(out / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported_vae[k], v.half()) for k, v in base_vae.items())

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "model", torch_dtype=torch.float16).to(device)
    image = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator(device).manual_seed(0),
    ).images[0]
    assert image.shape == (32, 32, 3)
    assert np.isfinite(image).all()

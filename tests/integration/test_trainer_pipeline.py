"""The trainer's content pipeline against real S3 (SeaweedFS): base model and instance images from a bucket, class
priors generated into the shared S3 cache and reused by a second job, a few training steps, validation samples,
and every export format written to the bucket and loaded back with diffusers."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from dreambooth_api.config import JobConfig
from dreambooth_trainer.components import load_components
from dreambooth_trainer.data import collate_fn
from dreambooth_trainer.export import export_model
from dreambooth_trainer.module import DreamBoothModule
from dreambooth_trainer.prepare import prepare_dataset
from dreambooth_trainer.priors import CLASS_IMAGES_GENERATED
from dreambooth_trainer.storage import ObjectStore
from dreambooth_trainer.tiny import build_tiny_pipeline
from dreambooth_trainer.validation import sample_and_upload
from tests.infra.s3 import S3Server

SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"


def subject_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.full((40, 48, 3), 200, np.uint8)
    y, x = rng.integers(0, 16, 2)
    arr[y : y + 20, x : x + 24] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def job(s3: S3Server, bucket: str, name: str) -> JobConfig:
    return JobConfig.model_validate(
        {
            "name": name,
            "baseModel": {"uri": f"s3://{bucket}/models/tiny"},
            "instanceImages": {
                "uri": f"s3://{bucket}/subjects/dog/",
                "prompt": "a photo of sks dog",
                "minResolution": 32,
            },
            "priorPreservation": {
                "enabled": True,
                "classPrompt": "a photo of dog",
                "numImages": 2,
                "steps": 2,
                "cacheUri": f"s3://{bucket}/class-cache",
            },
            "training": {
                "method": "lora",
                "resolution": 32,
                "maxSteps": 6,
                "learningRate": 1e-3,
                "validation": {"prompts": ["a photo of sks dog"], "steps": 2},
            },
            "output": {"uri": f"s3://{bucket}/jobs/{name}", "formats": ["diffusers", "safetensors", "lora"]},
            "storage": {"endpoint": s3.endpoint, "region": s3.region, "addressingStyle": "path"},
        }
    )


def test_pipeline_on_s3(s3: S3Server, aws_env: None, tmp_path: Path) -> None:
    bucket = s3.make_bucket()
    first = job(s3, bucket, "j1")
    store = ObjectStore(first.storage)
    store.upload_dir(build_tiny_pipeline(SHARED_MODELS / "tiny"), f"s3://{bucket}/models/tiny")
    for i in range(3):
        store.write_bytes(f"s3://{bucket}/subjects/dog/{i}.png", subject_png(i))

    generated_before = CLASS_IMAGES_GENERATED._value.get()
    comps = load_components(first.base_model, store, tmp_path / "models")
    dataset = prepare_dataset(first, comps, store)
    assert CLASS_IMAGES_GENERATED._value.get() - generated_before == 2
    assert len(store.list(f"s3://{bucket}/class-cache")) == 4  # 2 images, latents file, meta.json
    assert len(dataset) == 3

    torch.manual_seed(0)
    module = DreamBoothModule(comps, first.training, prior_loss_weight=first.prior_preservation.loss_weight)
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for step in range(first.training.max_steps):
        batch = collate_fn([dataset[(2 * step) % 3], dataset[(2 * step + 1) % 3]])
        assert batch["latent_params"].shape[0] == 4  # 2 instance + 2 class rows
        loss = module.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert all(np.isfinite(losses))

    uris = sample_and_upload(first, module, store, 6)
    assert uris == [f"s3://{bucket}/jobs/j1/samples/step-00000006/p0-i0.png"]
    assert store.read_bytes(uris[0]).startswith(b"\x89PNG")

    result = export_model(module, first, store, tmp_path / "export", steps=6, final_loss=losses[-1])
    assert set(result.uris) == {"diffusers", "safetensors", "lora", "readme"}
    local = tmp_path / "downloaded"
    store.download_dir(f"s3://{bucket}/jobs/j1", local)
    pipe = StableDiffusionPipeline.from_pretrained(local / "model")
    image = pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    single = StableDiffusionPipeline.from_single_file(str(local / "model.safetensors"), config=str(local / "model"))
    assert single.unet.config.block_out_channels == pipe.unet.config.block_out_channels
    assert (local / "lora" / "pytorch_lora_weights.safetensors").is_file()

    # a second job with the same class settings reuses the shared cache: nothing is generated
    second = job(s3, bucket, "j2")
    prepare_dataset(second, load_components(second.base_model, store, tmp_path / "models"), store)
    assert CLASS_IMAGES_GENERATED._value.get() - generated_before == 2

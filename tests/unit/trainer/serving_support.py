"""Helpers of the sampling server's tests (test_serving_*.py, test_trainer_serve.py): the tiny model, LoRA subjects
written the way the export writes them, a running server, the official openai client, and image comparison."""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import openai
import torch
from PIL import Image
from prometheus_client import REGISTRY

from dreambooth_api.config import BaseModelSpec, TrainingConfig
from dreambooth_trainer.components import load_components
from dreambooth_trainer.export import LORA_WEIGHT_NAME, write_lora
from dreambooth_trainer.module import DreamBoothModule
from dreambooth_trainer.serving.config import load_serve_config
from dreambooth_trainer.serving.server import Server
from dreambooth_trainer.storage import ObjectStore
from dreambooth_trainer.tiny import build_tiny_pipeline

# The tiny model is cached by config hash, so test files share one build.
SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"
SUBJECTS_VERSION = 1
"""Bump when the way `lora_subject` builds adapters changes (the cache is per machine)."""
PROMPT = "a photo of sks dog"
TOLERANCE = 2
"""A request's image batched with others equals its unbatched twin within this many 8-bit levels per channel
(docs/contracts.md; measured: at most 1 on the CPU in fp32)."""
# Small and quick: the tiny model's native size, two denoising steps.
LIMITS: dict[str, Any] = {"maxSteps": 4, "defaultSteps": 2, "maxResolution": 64, "defaultScheduler": "ddim"}


def tiny_model_uri() -> str:
    """The tiny diffusers folder (built once per machine), as a modelUri."""
    return build_tiny_pipeline(SHARED_MODELS / "tiny").as_uri()


def lora_subject(root: Path, seed: int) -> Path:
    """A random LoRA adapter of the tiny model (a LoRA job's export, `write_lora`), different for each seed, copied
    to `root/subject-<seed>/` (built once per machine: the build costs seconds); returns the folder."""
    folder = root / f"subject-{seed}"
    if not (folder / LORA_WEIGHT_NAME).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_built_subject(seed) / LORA_WEIGHT_NAME, folder / LORA_WEIGHT_NAME)
    return folder


def _built_subject(seed: int) -> Path:
    cached = SHARED_MODELS / f"serve-subjects-v{SUBJECTS_VERSION}" / f"subject-{seed}"
    if (cached / LORA_WEIGHT_NAME).is_file():
        return cached
    comps = load_components(BaseModelSpec(tiny=True), ObjectStore(), SHARED_MODELS)
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32))
    with torch.no_grad():
        for name, param in module.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".subject-", dir=cached.parent))
    write_lora(module, staging, torch.float32)
    try:
        staging.replace(cached)  # atomic: a concurrent run finds a whole folder or none
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another run won the race
    return cached


def config(**fields: Any) -> Any:
    """A ServeConfig of the tiny model with the small limits; `server=` entries are merged into them."""
    server = {**LIMITS, **fields.pop("server", {})}
    doc = {"modelUri": tiny_model_uri(), "server": server, **fields}
    return load_serve_config(json.dumps(doc))


@contextmanager
def running(cfg: Any, workdir: Path, token: str | None = None, *, ready: bool = True) -> Iterator[Server]:
    srv = Server(cfg, "127.0.0.1", 0, workdir=workdir, token=token)
    srv.start()
    try:
        if ready:
            assert srv.wait_loaded(180) == "ready", srv.lifecycle.error
        yield srv
    finally:
        srv.stop()


def client(srv: Server, key: str | None = None, **kwargs: Any) -> openai.OpenAI:
    """The official client, without its retries (the tests look at each answer); a server without a token ignores
    the key the client insists on."""
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key=key or "unused", max_retries=0, **kwargs)


def pixels(b64: str | None) -> np.ndarray[Any, Any]:
    assert b64 is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def max_diff(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> int:
    return int(np.abs(a - b).max())


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """A metric's current value in the process's registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def histogram_counts(name: str) -> dict[float, float]:
    """Cumulative bucket counts of a histogram by upper bound."""
    counts: dict[float, float] = {}
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.name == f"{name}_bucket":
                counts[float(s.labels["le"])] = s.value
    return counts

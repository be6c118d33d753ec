"""The loaded pipeline and its LoRA adapters: loading a model, checking a request against the limits, generating."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.serving import ServeConfig
from dreambooth_trainer.serving.metrics import IMAGES
from dreambooth_trainer.serving.protocol import GenerateRequest
from dreambooth_trainer.storage import ObjectStore, join_uri

MODEL_ADAPTER = "__model__"  # a LoRA-only modelUri; adapter names (DNS labels) cannot take this form
SINGLE_FILE_PREFIX = "model.diffusion_model."  # UNet keys of a single-file (original SD layout) checkpoint


def is_single_file_checkpoint(keys: Iterable[str]) -> bool:
    """True for a full checkpoint in the original Stable Diffusion key layout (not LoRA weights)."""
    return any(k.startswith(SINGLE_FILE_PREFIX) for k in keys)


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file, read from its header (8 bytes of length, then JSON)."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return [k for k in header if k != "__metadata__"]


class ModelRunner:
    """The loaded pipeline and its adapters."""

    def __init__(self, config: ServeConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.store = ObjectStore(config.storage)
        self.pipe: Any = None
        self.device = "cpu"
        self.lock = threading.Lock()
        self.adapter_weights = {a.name: a.weight for a in config.adapters}
        """The user's adapters (requests choose among these)."""
        self.model_lora = False
        """The modelUri is LoRA weights, loaded as `MODEL_ADAPTER` and always on at 1.0."""
        self.native_size: int | None = None
        """Width and height the pipeline uses when a request names none."""

    def load(self) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        pipe = self._load_pipeline(dtype)
        for name, folder in [(a.name, self._download_lora(a.uri, f"adapter-{a.name}")) for a in self.config.adapters]:
            pipe.load_lora_weights(str(folder), adapter_name=name)
        weights = self.active_weights(None)
        if weights:
            pipe.set_adapters(list(weights), list(weights.values()))
        pipe.set_progress_bar_config(disable=True)
        self.native_size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self.pipe = pipe.to(self.device)

    def _load_pipeline(self, dtype: Any) -> Any:
        """The model: a diffusers folder, a single-file checkpoint, or the base model (plus a LoRA modelUri)."""
        from diffusers import StableDiffusionPipeline

        c = self.config
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
        if c.model_uri and self.store.exists(join_uri(c.model_uri, "model_index.json")):
            return StableDiffusionPipeline.from_pretrained(self._download(c.model_uri, "model"), **kwargs)
        lora = self._download_lora(c.model_uri, "model-lora") if c.model_uri else None
        weights = lora / "pytorch_lora_weights.safetensors" if lora else None
        if weights is not None and weights.is_file() and is_single_file_checkpoint(safetensors_keys(weights)):
            config = str(self._base_dir()) if c.base_model else None
            return StableDiffusionPipeline.from_single_file(str(weights), config=config, **kwargs)
        if c.base_model is None:
            raise InvalidInputError(f"modelUri {c.model_uri} is LoRA weights or not a model, and no baseModel is given")
        pipe = StableDiffusionPipeline.from_pretrained(self._base_dir(), **kwargs)
        if lora is not None:
            pipe.load_lora_weights(str(lora), adapter_name=MODEL_ADAPTER)
            self.model_lora = True
        return pipe

    def _base_dir(self) -> Path:
        from dreambooth_trainer.components import model_cache_dir, resolve_model_dir

        assert self.config.base_model is not None
        return resolve_model_dir(self.config.base_model, self.store, model_cache_dir(self.workdir / "base"))

    def _download(self, uri: str, name: str) -> Path:
        target = self.workdir / name
        self.store.download_dir(uri, target)
        return target

    def _download_lora(self, uri: str, name: str) -> Path:
        target = self.workdir / name
        if uri.endswith(".safetensors"):
            self.store.download_file(uri, target / "pytorch_lora_weights.safetensors")
        else:
            self.store.download_dir(uri, target)
        return target

    def active_weights(self, chosen: Mapping[str, float] | None) -> dict[str, float]:
        """Adapter weights for a request: its choice (unnamed adapters off), else each at its default;
        a LoRA modelUri is always on."""
        weights = dict(self.adapter_weights)
        if chosen is not None:
            weights = dict.fromkeys(self.adapter_weights, 0.0) | dict(chosen)
        return {MODEL_ADAPTER: 1.0, **weights} if self.model_lora else weights

    def check(self, req: GenerateRequest) -> str | None:
        """Why the request is out of limits, or None."""
        lim = self.config.server
        if (req.steps or lim.default_steps) > lim.max_steps:
            return f"steps may not exceed {lim.max_steps}"
        if req.num_images > lim.max_images_per_request:
            return f"numImages may not exceed {lim.max_images_per_request}"
        for dim in ("width", "height"):
            value = getattr(req, dim)
            size = value if value is not None else self.native_size
            if size is not None and size > lim.max_resolution:
                named = "" if value is not None else f" (the model's native size {size}; name a smaller one)"
                return f"{dim} may not exceed {lim.max_resolution}{named}"
        unknown = sorted(set(req.adapters or {}) - set(self.adapter_weights))
        if unknown:
            return f"unknown adapters {unknown}; loaded: {sorted(self.adapter_weights)}"
        return None

    def generate(self, req: GenerateRequest) -> tuple[list[Any], int]:
        import torch

        from dreambooth_trainer.pipelines import make_scheduler

        lim = self.config.server
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**31)
        with self.lock:
            pipe = self.pipe
            pipe.scheduler = make_scheduler(req.scheduler or lim.default_scheduler, pipe.scheduler.config)
            weights = self.active_weights(req.adapters)
            if weights:
                pipe.set_adapters(list(weights), list(weights.values()))
            images: list[Any] = []
            while len(images) < req.num_images:
                n = min(lim.max_batch_size, req.num_images - len(images))
                gens = [torch.Generator("cpu").manual_seed(seed + len(images) + i) for i in range(n)]
                out = pipe(
                    req.prompt,
                    negative_prompt=req.negative_prompt,
                    num_inference_steps=req.steps or lim.default_steps,
                    guidance_scale=req.guidance_scale if req.guidance_scale is not None else lim.default_guidance_scale,
                    width=req.width,
                    height=req.height,
                    num_images_per_prompt=n,
                    generator=gens,
                )
                images.extend(out.images)
        IMAGES.inc(len(images))
        return images, seed

"""The loaded pipeline: loading a model (three kinds of modelUri), its native size, and one batched pipeline call.

Only the engine's worker thread calls `generate` and mutates the pipeline (the adapters too, `adapters.py`);
`count_tokens` uses a copy of the tokenizer, for the event loop's thread.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dreambooth_api.config import Sampler
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.serving import ServeConfig
from dreambooth_trainer.export.manifest import MODEL_INDEX, check_model_folder
from dreambooth_trainer.export.writers import LORA_WEIGHT_NAME, RESOLUTION_METADATA
from dreambooth_trainer.storage import ObjectStore, join_uri

MODEL_ADAPTER: Final = "__model__"
"""A LoRA-only modelUri, always on at 1.0; adapter names (DNS labels) cannot take this form."""
SINGLE_FILE_PREFIX: Final = "model.diffusion_model."
"""UNet keys of a single-file (original SD layout) checkpoint."""


def is_single_file_checkpoint(keys: Iterable[str]) -> bool:
    """True for a full checkpoint in the original Stable Diffusion key layout (not LoRA weights)."""
    return any(k.startswith(SINGLE_FILE_PREFIX) for k in keys)


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (8 bytes of length, then JSON): tensor names, and `__metadata__`."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header: dict[str, Any] = json.loads(f.read(size))
    return header


@dataclass(frozen=True)
class Sampling:
    """What a pipeline call shares among its images: requests batch together only when these are equal."""

    width: int
    height: int
    steps: int
    scheduler: Sampler
    guidance_scale: float


@dataclass(frozen=True)
class Sample:
    """One image to generate."""

    prompt: str
    negative_prompt: str
    seed: int


def download_lora(store: ObjectStore, uri: str, target: Path) -> Path:
    """LoRA weights (a folder or its .safetensors file) into `target/`; returns the folder."""
    if uri.endswith(".safetensors"):
        store.download_file(uri, target / LORA_WEIGHT_NAME)
    else:
        store.download_dir(uri, target)
    return target


class ModelRunner:
    """The loaded pipeline (after `load`)."""

    def __init__(self, config: ServeConfig, workdir: Path, store: ObjectStore | None = None) -> None:
        self.config = config
        self.workdir = workdir
        self.store = store or ObjectStore(config.storage)
        self.pipe: Any = None
        self.device = "cpu"
        self.model_lora = False
        """The modelUri is LoRA weights, loaded as `MODEL_ADAPTER` and always on at 1.0."""
        self.native_size = 512
        """Width and height when a request names none: the training resolution recorded at export, else the UNet's
        sample size times the VAE's scale factor."""
        self.max_tokens = 77
        """The text encoder's context in tokens (start and end tokens included)."""
        self._tokenizer: Any = None
        self._scheduler_config: Any = None
        self._schedulers: dict[Sampler, Any] = {}

    # ----- loading -----------------------------------------------------------------------------------
    def load(self) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        pipe, resolution = self._load_pipeline(dtype)
        pipe.set_progress_bar_config(disable=True)
        scale = int(pipe.vae_scale_factor)
        self.native_size = resolution or int(pipe.unet.config.sample_size) * scale
        self._tokenizer = copy.deepcopy(pipe.tokenizer)
        self.max_tokens = int(getattr(pipe.tokenizer, "model_max_length", 77) or 77)
        self._scheduler_config = pipe.scheduler.config
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            pipe.unet.to(memory_format=torch.channels_last)
        self.pipe = pipe.to(self.device)

    def _load_pipeline(self, dtype: Any) -> tuple[Any, int | None]:
        """The model and its training resolution (when known): a diffusers folder, a single-file checkpoint, or
        the base model (plus a LoRA modelUri)."""
        from diffusers import StableDiffusionPipeline

        c = self.config
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
        if c.model_uri and self.store.exists(join_uri(c.model_uri, MODEL_INDEX)):
            folder = check_model_folder(self.store, c.model_uri)  # a folder of ours must be complete
            local = self.workdir / "model"
            self.store.download_dir(c.model_uri, local)
            return StableDiffusionPipeline.from_pretrained(local, **kwargs), folder.resolution
        lora = download_lora(self.store, c.model_uri, self.workdir / "model-lora") if c.model_uri else None
        weights = lora / LORA_WEIGHT_NAME if lora else None
        if weights is not None and weights.is_file():
            header = safetensors_header(weights)
            if is_single_file_checkpoint(header):
                config = str(self._base_dir()) if c.base_model else None
                pipe = StableDiffusionPipeline.from_single_file(str(weights), config=config, **kwargs)
                resolution = str((header.get("__metadata__") or {}).get(RESOLUTION_METADATA, ""))
                return pipe, int(resolution) if resolution.isdigit() else None
        if c.base_model is None:
            raise InvalidInputError(f"modelUri {c.model_uri} is LoRA weights or not a model, and no baseModel is given")
        pipe = StableDiffusionPipeline.from_pretrained(self._base_dir(), **kwargs)
        if lora is not None:
            pipe.load_lora_weights(str(lora), adapter_name=MODEL_ADAPTER)
            self.model_lora = True
        return pipe, None

    def _base_dir(self) -> Path:
        from dreambooth_trainer.components import model_cache_dir, resolve_model_dir

        assert self.config.base_model is not None
        return resolve_model_dir(self.config.base_model, self.store, model_cache_dir(self.workdir / "base"))

    # ----- requests ----------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as the text encoder would see them uncut (start and end tokens included)."""
        ids = self._tokenizer(text, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
        return len(ids)

    def generate(
        self, sampling: Sampling, samples: Sequence[Sample], should_stop: Callable[[], bool] | None = None
    ) -> list[Any]:
        """One pipeline call for `samples` (PIL images, in order). Each sample has its own generator, so its image
        does not depend on the others in the call; classifier-free guidance's two passes share the call (the
        pipeline concatenates them). `should_stop` is asked after every step: True skips the remaining steps."""
        import torch

        pipe = self.pipe
        pipe.scheduler = self._scheduler(sampling.scheduler)
        negatives = [s.negative_prompt for s in samples]

        def step_end(p: Any, _step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if should_stop is not None and should_stop():
                p._interrupt = True
            return kwargs

        with torch.inference_mode():
            out = pipe(
                prompt=[s.prompt for s in samples],
                negative_prompt=negatives if any(negatives) else None,
                num_inference_steps=sampling.steps,
                guidance_scale=sampling.guidance_scale,
                width=sampling.width,
                height=sampling.height,
                num_images_per_prompt=1,
                generator=[torch.Generator("cpu").manual_seed(s.seed) for s in samples],
                callback_on_step_end=step_end,
            )
        return list(out.images)

    def _scheduler(self, kind: Sampler) -> Any:
        from dreambooth_trainer.pipelines import make_scheduler

        if kind not in self._schedulers:
            self._schedulers[kind] = make_scheduler(kind, self._scheduler_config)
        return self._schedulers[kind]

    def gpu_memory(self) -> tuple[int, int]:
        """CUDA memory (allocated, reserved) in bytes; zeros on the CPU."""
        import torch

        if self.device != "cuda":
            return 0, 0
        return int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved())

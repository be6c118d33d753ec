"""Instance (and class) images: loading and validating them, the Dataset, and the collate function.

Loading fails fast with `InvalidInputError` naming the object: a missing prefix, an undecodable or too-small image, a
missing caption or one without the identifier token, fewer images than `minImages`.

The Dataset is map-style and deterministic: item `i` in epoch `e` always has the same crop and flip (they come from
a generator seeded with (seed, epoch, kind, i)), so a resumed run replays the same data; the runtime's sampler
decides the order. With prior preservation every item holds an instance example and a class example, and
`collate_fn` concatenates them (instances first), so one forward pass computes both losses.

When the VAE and the text encoder are frozen, `cache_latents` / `cache_text_embeddings` encode every distinct
(image, flip) and prompt once; items then carry `latent_params` (the VAE's Gaussian parameters, sampled per step)
and `prompt_embeds` instead of `pixel_values` and `input_ids`. Random crops cannot be cached (each is different).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dreambooth_api.config import Crop, InstanceImagesSpec
from dreambooth_api.evaluation import CaptionMode
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.vlm.captions import identifier_tokens
from dreambooth_trainer.imageio import (
    check_size,
    crop_box,
    decode_image,
    is_image_name,
    resize_shorter_side,
    to_tensor,
)
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore

INSTANCE = 0
CLASS = 1


@dataclass
class Example:
    """One training image, already resized so its shorter side is the training resolution, and its caption."""

    source: str
    image: Image.Image
    caption: str


def list_instance_uris(spec: InstanceImagesSpec, store: ObjectStore) -> list[str]:
    """The image URIs of the instance set (a prefix's jpg/jpeg/png/webp objects, or the explicit list)."""
    return [uri for uri, _size in list_instance_objects(spec, store)]


def list_instance_objects(spec: InstanceImagesSpec, store: ObjectStore) -> list[tuple[str, int | None]]:
    """The instance images as (URI, size in bytes); the size is None for an explicit list (not listed)."""
    if spec.files is not None:
        return [(uri, None) for uri in spec.files]
    assert spec.uri is not None
    objects: list[tuple[str, int | None]] = [(o.uri, o.size) for o in store.list(spec.uri) if is_image_name(o.uri)]
    if not objects:
        raise InvalidInputError(f"no instance images (jpg, jpeg, png, webp) under instanceImages.uri {spec.uri}")
    return objects


def _caption_uri(image_uri: str) -> str:
    stem, _dot, _ext = image_uri.rpartition(".")
    return f"{stem}.txt"


def load_instance_examples(
    spec: InstanceImagesSpec,
    store: ObjectStore,
    resolution: int,
    class_prompt: str | None = None,
) -> list[Example]:
    """Read, decode, validate and resize the instance images (and their captions). Fails on the first bad one."""
    objects = list_instance_objects(spec, store)
    if len(objects) < spec.min_images:
        where = spec.uri or "instanceImages.files"
        raise InvalidInputError(
            f"found {len(objects)} instance images in {where}, fewer than minImages={spec.min_images}"
        )
    min_side = max(spec.min_resolution, 1)
    with_captions = spec.captions is not CaptionMode.OFF
    identifiers = identifier_tokens(spec, class_prompt) if with_captions else []
    if with_captions and not identifiers:
        raise InvalidInputError(
            f"captions: {spec.captions} needs the identifier token: set instanceImages.identifier (or a class prompt)"
        )
    examples = []
    for uri, size in objects:
        if size is not None:
            check_size(size, uri)  # before reading the object into memory
        try:
            data = store.read_bytes(uri)
        except ObjectNotFoundError as err:
            raise InvalidInputError(f"instance image {uri} does not exist") from err
        image = decode_image(data, uri, min_resolution=min_side)
        caption = spec.prompt
        if with_captions:
            caption = _read_caption(store, uri, identifiers)
        examples.append(Example(uri, resize_shorter_side(image, resolution), caption))
    return examples


def _read_caption(store: ObjectStore, image_uri: str, identifiers: list[str]) -> str:
    uri = _caption_uri(image_uri)
    try:
        raw = store.read_bytes(uri)
    except ObjectNotFoundError as err:
        raise InvalidInputError(f"caption {uri} for instance image {image_uri} does not exist") from err
    try:
        caption = " ".join(raw.decode("utf-8").split())
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"caption {uri} is not UTF-8 text") from err
    words = caption.split()
    if not any(tok in words for tok in identifiers):
        raise InvalidInputError(f"caption {uri} does not contain the identifier token {' or '.join(identifiers)!r}")
    return caption


def class_examples(
    images: Sequence[Image.Image], prompt: str, resolution: int, sources: Sequence[str]
) -> list[Example]:
    return [
        Example(src, resize_shorter_side(img.convert("RGB"), resolution), prompt)
        for img, src in zip(images, sources, strict=True)
    ]


class DreamBoothDataset(Dataset[dict[str, dict[str, torch.Tensor]]]):
    """Map-style: item i is {"instance": row, "class": row} (class only with prior preservation).

    A row holds `pixel_values` (3xHxW in [-1, 1]) or `latent_params` (cached), and `input_ids` or `prompt_embeds`.
    """

    def __init__(
        self,
        instances: list[Example],
        tokenizer: Any,
        resolution: int,
        classes: list[Example] | None = None,
        crop: Crop = Crop.CENTER,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        if not instances:
            raise InvalidInputError("no instance images")
        self.instances = instances
        self.classes = classes or []
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.crop = crop
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        self._ids: dict[str, torch.Tensor] = {}
        self._embeds: dict[str, torch.Tensor] = {}
        self._latents: dict[tuple[int, int, bool], torch.Tensor] = {}

    @property
    def with_prior(self) -> bool:
        return bool(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips items get (call it before each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        item = {"instance": self._row(INSTANCE, index % len(self.instances), index)}
        if self.classes:
            item["class"] = self._row(CLASS, index % len(self.classes), index)
        return item

    # ----- rows --------------------------------------------------------------------------------------
    def _choices(self, kind: int, index: int) -> tuple[float, float, bool]:
        rng = np.random.default_rng([self.seed, self.epoch, kind, index])
        left, top, coin = rng.random(3)
        if self.crop is Crop.CENTER:
            left = top = 0.5
        return float(left), float(top), bool(self.flip and coin < 0.5)

    def _row(self, kind: int, example_index: int, index: int) -> dict[str, torch.Tensor]:
        example = (self.instances if kind == INSTANCE else self.classes)[example_index]
        left, top, flipped = self._choices(kind, index)
        row: dict[str, torch.Tensor] = {}
        cached = self._latents.get((kind, example_index, flipped))
        if cached is not None:
            row["latent_params"] = cached
        else:
            row["pixel_values"] = self.pixels(example, left, top, flipped)
        if example.caption in self._embeds:
            row["prompt_embeds"] = self._embeds[example.caption]
        else:
            row["input_ids"] = self.input_ids(example.caption)
        return row

    def pixels(self, example: Example, left: float = 0.5, top: float = 0.5, flipped: bool = False) -> torch.Tensor:
        img = example.image.crop(crop_box(example.image.size, self.resolution, left, top))
        if flipped:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img)

    def input_ids(self, caption: str) -> torch.Tensor:
        ids = self._ids.get(caption)
        if ids is None:
            ids = self.tokenizer(
                caption,
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids[0]
            self._ids[caption] = ids
        return ids

    def captions(self) -> list[str]:
        return sorted({e.caption for e in self.instances + self.classes})

    # ----- caches ------------------------------------------------------------------------------------
    @property
    def can_cache_latents(self) -> bool:
        return self.crop is Crop.CENTER

    @torch.no_grad()
    def cache_latents(
        self,
        vae: Any,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        preset: dict[tuple[int, int, bool], torch.Tensor] | None = None,
    ) -> int:
        """Encode every (image, flip) once with the frozen VAE; returns how many were encoded (0 with random crops).

        `preset` supplies already-known entries, for example class latents from the prior cache.
        """
        if not self.can_cache_latents:
            return 0
        self._latents.update(preset or {})
        flips = (False, True) if self.flip else (False,)
        todo = [
            (kind, i, f)
            for kind, examples in ((INSTANCE, self.instances), (CLASS, self.classes))
            for i in range(len(examples))
            for f in flips
            if (kind, i, f) not in self._latents
        ]
        for start in range(0, len(todo), batch_size):
            keys = todo[start : start + batch_size]
            pixels = torch.stack(
                [self.pixels((self.instances if k == INSTANCE else self.classes)[i], flipped=f) for k, i, f in keys]
            )
            params = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist.parameters
            for key, p in zip(keys, params.float().cpu(), strict=True):
                self._latents[key] = p.clone()
        return len(todo)

    @torch.no_grad()
    def cache_text_embeddings(
        self, text_encoder: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> int:
        """Encode every distinct caption once with the frozen text encoder; returns how many were encoded."""
        todo = [c for c in self.captions() if c not in self._embeds]
        for caption in todo:
            ids = self.input_ids(caption).unsqueeze(0).to(device)
            self._embeds[caption] = text_encoder(ids)[0][0].to(dtype=dtype).float().cpu().clone()
        return len(todo)

    def clear_text_embeddings(self) -> None:
        """Drop cached prompt embeddings (when the text encoder starts training, or after it changed)."""
        self._embeds.clear()


ROW_KEYS = ("pixel_values", "latent_params", "input_ids", "prompt_embeds")


def collate_fn(items: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, Any]:
    """Stack items into a batch: instance rows first, then class rows; `num_instance` says where they split."""
    rows = [it["instance"] for it in items] + [it["class"] for it in items if "class" in it]
    batch: dict[str, Any] = {"num_instance": len(items)}
    for key in ROW_KEYS:
        present = [key in r for r in rows]
        if all(present):
            batch[key] = torch.stack([r[key] for r in rows])
        elif any(present):
            raise ValueError(f"batch mixes rows with and without {key}")
    return batch

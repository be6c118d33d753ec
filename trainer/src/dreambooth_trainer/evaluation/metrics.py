"""The DreamBooth paper's metrics: DINO, CLIP-I and CLIP-T.

- DINO: the mean cosine similarity between the DINO ViT CLS embeddings of every (sample, reference image) pair.
  DINO is self-supervised and not trained to ignore differences within a class, so it rewards the same subject
  more than CLIP does (two different corgis look alike to CLIP).
- CLIP-I: the same mean over CLIP image embeddings.
- CLIP-T: the mean cosine similarity between each sample's CLIP image embedding and the CLIP text embedding of the
  prompt it was generated from, with the subject named by its class ("a dog in the jungle", not "a sks dog in the
  jungle"): the identifier is a rare token that CLIP reads as noise, and the metric measures prompt fidelity.

The math (`cosine_matrix`, `mean_pairwise_cosine`, `mean_matched_cosine`, `score`) works on embedding tensors and
knows nothing of models. The embedders run transformers' models with the processors saved beside them (the slow,
PIL-based image processors, which the published numbers were computed with), in batches, under no_grad.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from PIL import Image

from dreambooth_api.evaluation import EvaluationSpec, MetricScores
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.evaluation.fetch import ModelSource, resolve_metric_model
from dreambooth_trainer.storage import ObjectStore

BATCH_SIZE = 16
# Scores are reported to 4 decimals (float32 cosines of identical inputs come out as 0.99999994).
SCORE_DECIMALS = 4


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` [n, d] with every row of `b` [m, d]: [n, m], in float32."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def mean_pairwise_cosine(samples: torch.Tensor, references: torch.Tensor) -> float:
    """DINO and CLIP-I: the mean cosine over all (sample, reference) pairs."""
    if samples.shape[0] == 0 or references.shape[0] == 0:
        raise ValueError("mean_pairwise_cosine needs at least one sample and one reference")
    return float(cosine_matrix(samples, references).mean().item())


def mean_matched_cosine(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T: the mean cosine of row i of `images` with row i of `texts` (each sample with its prompt)."""
    if images.shape != texts.shape or images.shape[0] == 0:
        raise ValueError(f"mean_matched_cosine needs equal, non-empty shapes, got {images.shape} and {texts.shape}")
    return float((F.normalize(images.float(), dim=-1) * F.normalize(texts.float(), dim=-1)).sum(-1).mean().item())


@dataclass
class Embeddings:
    """The DINO and CLIP embeddings of a set of images (rows in the images' order), on the CPU."""

    dino: torch.Tensor
    clip: torch.Tensor

    def rows(self, start: int, stop: int) -> Embeddings:
        return Embeddings(self.dino[start:stop], self.clip[start:stop])


def score(samples: Embeddings, references: Embeddings, prompt_embeddings: torch.Tensor) -> MetricScores:
    """DINO, CLIP-I and CLIP-T of `samples` (4 decimals); `prompt_embeddings` has one CLIP text embedding per
    sample."""
    return MetricScores(
        dino=round(mean_pairwise_cosine(samples.dino, references.dino), SCORE_DECIMALS),
        clip_i=round(mean_pairwise_cosine(samples.clip, references.clip), SCORE_DECIMALS),
        clip_t=round(mean_matched_cosine(samples.clip, prompt_embeddings), SCORE_DECIMALS),
    )


def _batches(items: Sequence[Any], size: int = BATCH_SIZE) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [img if img.mode == "RGB" else img.convert("RGB") for img in images]


def _features(output: Any) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers 4.x and a model output with `pooler_output` in later ones."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DinoEmbedder:
    """A DINO ViT (transformers `AutoModel`, e.g. ViTModel) and its image processor; embeddings are CLS tokens."""

    def __init__(self, model: Any, processor: Any, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's input for `images`, as its processor prepares it."""
        out: torch.Tensor = self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        return out

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The CLS embeddings [n, hidden] of `images` (the last layer, after the final layer norm)."""
        chunks = []
        for batch in _batches(images):
            pixels = self.pixel_values(batch).to(self.device)
            chunks.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, 0)


class ClipEmbedder:
    """A CLIPModel with its image processor and tokenizer; embeddings are the projected image and text features."""

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out: torch.Tensor = self.image_processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        return out

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for batch in _batches(images):
            pixels = self.pixel_values(batch).to(self.device)
            chunks.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, 0)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings; texts longer than the model's 77 tokens are truncated, as CLIP was trained."""
        chunks = []
        for batch in _batches(texts):
            tokens = self.tokenizer(list(batch), padding=True, truncation=True, return_tensors="pt").to(self.device)
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            chunks.append(_features(features).float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, 0)


@dataclass
class MetricModels:
    """The two embedders, and the identities of their weights (recorded with the scores)."""

    dino: DinoEmbedder
    clip: ClipEmbedder
    dino_identity: str = ""
    clip_identity: str = ""

    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        return Embeddings(self.dino.embed(images), self.clip.embed_images(images))


def _pretrained_kwargs(source: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if source.revision is not None:
        kwargs["revision"] = source.revision
    if source.cache_dir is not None:
        kwargs["cache_dir"] = source.cache_dir
    return kwargs


def load_dino(source: ModelSource, device: torch.device | str = "cpu") -> DinoEmbedder:
    """A DINO embedder from a hub id or a local folder (transformers' `from_pretrained`)."""
    from transformers import AutoImageProcessor, AutoModel

    kwargs = _pretrained_kwargs(source)
    try:
        model = AutoModel.from_pretrained(source.location, **kwargs)
        processor = AutoImageProcessor.from_pretrained(source.location, use_fast=False, **kwargs)
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"the DINO model {source.identity} cannot be loaded: {err}") from err
    return DinoEmbedder(model, processor, device)


def load_clip(source: ModelSource, device: torch.device | str = "cpu") -> ClipEmbedder:
    """A CLIP embedder from a hub id or a local folder (transformers' `from_pretrained`)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    kwargs = _pretrained_kwargs(source)
    try:
        model = CLIPModel.from_pretrained(source.location, **kwargs)
        processor = AutoImageProcessor.from_pretrained(source.location, use_fast=False, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"the CLIP model {source.identity} cannot be loaded: {err}") from err
    return ClipEmbedder(model, processor, tokenizer, device)


def load_metric_models(
    spec: EvaluationSpec,
    cache_dir: Path,
    store: ObjectStore | None = None,
    device: torch.device | str = "cpu",
) -> MetricModels:
    """The DINO and CLIP embedders of `spec` (object-storage folders are downloaded into `cache_dir` once)."""
    dino = resolve_metric_model(spec.dino(), "dino", cache_dir, store)
    clip = resolve_metric_model(spec.clip(), "clip", cache_dir, store)
    return MetricModels(load_dino(dino, device), load_clip(clip, device), dino.identity, clip.identity)

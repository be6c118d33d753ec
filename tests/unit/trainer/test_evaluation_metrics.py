"""DINO, CLIP-I and CLIP-T: the math on hand-built embeddings, and the real transformers code path on tiny random
models whose processors are configured as the real models' (preprocessing checked by hand)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_api.evaluation import EvaluationSpec, MetricModelSpec
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.evaluation import tiny
from dreambooth_trainer.evaluation.fetch import ModelSource, fetch_model_folder, resolve_metric_model
from dreambooth_trainer.evaluation.metrics import (
    Embeddings,
    MetricModels,
    cosine_matrix,
    load_clip,
    load_dino,
    load_metric_models,
    mean_matched_cosine,
    mean_pairwise_cosine,
    score,
)
from dreambooth_trainer.storage import ObjectStore

SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"
TINY = EvaluationSpec(dino_model=MetricModelSpec(tiny=True), clip_model=MetricModelSpec(tiny=True))


@pytest.fixture(scope="module")
def models() -> MetricModels:
    return load_metric_models(TINY, SHARED_MODELS)


def test_cosine_math_on_hand_built_embeddings() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert torch.allclose(cosine_matrix(a, a).diagonal(), torch.ones(3))
    assert cosine_matrix(a[:1], a[1:2]).item() == 0.0  # orthogonal
    assert cosine_matrix(a[:1], -a[:1]).item() == -1.0
    assert cosine_matrix(a[2:], a[:2]).tolist() == [[pytest.approx(0.6), pytest.approx(0.8)]]
    assert mean_pairwise_cosine(a[:1], a[:1] * 7) == pytest.approx(1.0)  # identical up to scale
    assert mean_pairwise_cosine(a[:1], a[1:2]) == 0.0
    assert mean_pairwise_cosine(a[:2], a[:1]) == pytest.approx(0.5)  # mean over all (sample, reference) pairs
    assert mean_pairwise_cosine(a[2:], a[:2]) == pytest.approx(0.7)
    assert mean_matched_cosine(a[:2], torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)  # row by row
    with pytest.raises(ValueError, match="equal, non-empty shapes"):
        mean_matched_cosine(a, a[:2])
    with pytest.raises(ValueError, match="at least one"):
        mean_pairwise_cosine(a[:0], a)


def test_score_of_identical_and_orthogonal_embeddings() -> None:
    e = torch.eye(4)
    same = score(Embeddings(e[:2], e[:2] * 3), Embeddings(e[:2], e[:2]), e[:2])
    # Pairwise over all pairs: each sample matches one of the two references, so the mean is 0.5.
    assert (same.dino, same.clip_i, same.clip_t) == (0.5, 0.5, 1.0)
    one = score(Embeddings(e[:1], e[:1]), Embeddings(e[:1], e[:1]), e[:1])
    assert (one.dino, one.clip_i, one.clip_t) == (1.0, 1.0, 1.0)
    orthogonal = score(Embeddings(e[:1], e[:1]), Embeddings(e[1:2], e[1:2]), e[3:4])
    assert (orthogonal.dino, orthogonal.clip_i, orthogonal.clip_t) == (0.0, 0.0, 0.0)


def test_identical_images_score_one(models: MetricModels) -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    result = score(models.embed([photo, photo.copy()]), models.embed([photo]), models.clip.embed_texts(["a", "a"]))
    assert result.dino == 1.0
    assert result.clip_i == 1.0
    other = Image.new("RGB", (40, 56), (0, 255, 0))
    different = score(models.embed([other]), models.embed([photo]), models.clip.embed_texts(["a"]))
    assert different.dino is not None
    assert different.dino < 1.0


def _normalized(image: Image.Image, mean: list[float], std: list[float]) -> torch.Tensor:
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def test_dino_preprocessing_is_dino_vits16s(models: MetricModels) -> None:
    """facebook/dino-vits16: resize to 224 x 224 (bilinear), scale to [0, 1], ImageNet mean and std."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    expected = _normalized(image.resize((224, 224), Image.Resampling.BILINEAR), tiny.IMAGENET_MEAN, tiny.IMAGENET_STD)
    actual = models.dino.pixel_values([image])
    assert actual.shape == (1, 3, 224, 224)
    assert torch.allclose(actual[0], expected, atol=1e-5)


def test_clip_preprocessing_is_clips(models: MetricModels) -> None:
    """CLIP: shorter side to 224 (bicubic), centre crop 224 x 224, CLIP's mean and std; greyscale to RGB."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 60, 3), dtype=np.uint8))
    resized = image.resize((448, 224), Image.Resampling.BICUBIC).crop((112, 0, 336, 224))
    expected = _normalized(resized, tiny.CLIP_MEAN, tiny.CLIP_STD)
    actual = models.clip.pixel_values([image])
    assert actual.shape == (1, 3, 224, 224)
    assert torch.allclose(actual[0], expected, atol=1e-5)
    grey = image.convert("L")
    assert torch.allclose(models.clip.pixel_values([grey])[0], models.clip.pixel_values([grey.convert("RGB")])[0])


def test_tiny_processors_carry_the_real_models_settings() -> None:
    dino = json.loads((tiny.build_tiny_metric_model("dino", SHARED_MODELS / "tiny") / "preprocessor_config.json")
                      .read_text())  # fmt: skip
    assert (dino["size"], dino["resample"], dino["image_mean"], dino["image_std"]) == (
        {"height": 224, "width": 224}, 2, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # fmt: skip
    clip = json.loads((tiny.build_tiny_metric_model("clip", SHARED_MODELS / "tiny") / "preprocessor_config.json")
                      .read_text())  # fmt: skip
    assert (clip["size"], clip["crop_size"], clip["resample"], clip["image_mean"]) == (
        {"shortest_edge": 224}, {"height": 224, "width": 224}, 3, [0.48145466, 0.4578275, 0.40821073])  # fmt: skip


def test_embeddings_are_batched_and_texts_truncated(models: MetricModels) -> None:
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(18)]
    together = models.dino.embed(images)  # two batches of at most 16
    alone = torch.cat([models.dino.embed([img]) for img in images[15:]])
    assert together.shape == (18, tiny.VISION["hidden_size"])
    assert torch.allclose(together[15:], alone, atol=1e-5)
    with torch.no_grad():
        direct = models.dino.model(pixel_values=models.dino.pixel_values(images[:1])).last_hidden_state[:, 0]
    assert torch.allclose(together[:1], direct, atol=1e-5)  # the CLS token
    texts = models.clip.embed_texts(["a dog on the beach", "dog " * 200])
    assert texts.shape == (2, tiny.PROJECTION_DIM)
    assert models.clip.embed_images(images[:2]).shape == (2, tiny.PROJECTION_DIM)


def test_hub_ids_go_to_from_pretrained_with_revision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transformers

    source = resolve_metric_model(MetricModelSpec(id="facebook/dino-vits16", revision="c0ffee"), "dino", tmp_path)
    assert source == ModelSource("facebook/dino-vits16", "hub:facebook/dino-vits16@c0ffee", "c0ffee",
                                 str(tmp_path / "hub"))  # fmt: skip
    calls: list[tuple[str, dict[str, Any]]] = []
    folder = tiny.build_tiny_metric_model("dino", SHARED_MODELS / "tiny")
    real_model, real_processor = transformers.AutoModel.from_pretrained, transformers.AutoImageProcessor.from_pretrained

    def fake(real: Any) -> Any:
        def load(name: str, **kwargs: Any) -> Any:
            calls.append((name, kwargs))
            return real(folder, use_fast=False) if "use_fast" in kwargs else real(folder)

        return load

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake(real_model))
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", fake(real_processor))
    load_dino(source)
    hub = {"revision": "c0ffee", "cache_dir": str(tmp_path / "hub")}
    assert calls == [("facebook/dino-vits16", hub), ("facebook/dino-vits16", {"use_fast": False, **hub})]


def test_object_storage_folder_is_downloaded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "bucket" / "clip"
    shutil.copytree(tiny.build_tiny_metric_model("clip", SHARED_MODELS / "tiny"), src)
    spec = MetricModelSpec(uri=src.as_uri())
    store = ObjectStore()
    first = resolve_metric_model(spec, "clip", tmp_path / "cache", store)
    assert first.identity == f"uri:{src.as_uri()}"
    assert Path(first.location).parent == tmp_path / "cache" / "metric-models"
    assert (Path(first.location) / "config.json").is_file()
    load_clip(first)

    downloads: list[str] = []
    monkeypatch.setattr(store, "download_file", lambda uri, _local: downloads.append(uri))
    assert resolve_metric_model(spec, "clip", tmp_path / "cache", store) == first
    assert downloads == []


def test_missing_or_wrong_model_folders_are_input_errors(tmp_path: Path) -> None:
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hi")
    with pytest.raises(InvalidInputError, match="not a transformers model folder"):
        fetch_model_folder((tmp_path / "notamodel").as_uri(), ObjectStore(), tmp_path / "cache")
    with pytest.raises(InvalidInputError, match="metric model file:///"):
        fetch_model_folder((tmp_path / "missing").as_uri(), ObjectStore(), tmp_path / "cache")
    with pytest.raises(InvalidInputError, match="the DINO model x cannot be loaded"):
        load_dino(ModelSource(str(tmp_path / "notamodel"), "x"))

"""Instance image loading and validation, the deterministic Dataset, collation with priors, and the caches."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_api.config import BaseModelSpec, Crop, InstanceImagesSpec, JobConfig
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.components import load_components
from dreambooth_trainer.data import DreamBoothDataset, Example, collate_fn, load_instance_examples
from dreambooth_trainer.storage import ObjectStore

# The tiny model is cached by config hash, so test files share one build.
SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"


def png(size: tuple[int, int] = (48, 40), seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def store() -> ObjectStore:
    return ObjectStore()


def put(store: ObjectStore, root: Path, name: str, data: bytes) -> str:
    uri = (root / name).as_uri()
    store.write_bytes(uri, data)
    return uri


def spec(root: Path, **kw: object) -> InstanceImagesSpec:
    return InstanceImagesSpec.model_validate(
        {"uri": root.as_uri(), "prompt": "a photo of sks dog", "minResolution": 32, **kw}
    )


def test_loads_resizes_and_skips_non_images(store: ObjectStore, tmp_path: Path) -> None:
    put(store, tmp_path, "a.png", png((64, 48)))
    put(store, tmp_path, "sub/b.PNG", png((40, 80), seed=1, mode="RGBA"))
    put(store, tmp_path, "notes.json", b"{}")
    examples = load_instance_examples(spec(tmp_path), store, resolution=32)
    assert [Path(e.source).name for e in examples] == ["a.png", "b.PNG"]
    assert [e.image.size for e in examples] == [(43, 32), (32, 64)]
    assert all(e.image.mode == "RGB" and e.caption == "a photo of sks dog" for e in examples)


def test_exif_orientation_is_applied(store: ObjectStore, tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 80), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    put(store, tmp_path, "rot.jpg", buf.getvalue())
    (example,) = load_instance_examples(spec(tmp_path), store, resolution=32)
    assert example.image.size == (64, 32)  # landscape after the transpose


CAPTIONS = {"captions": True, "identifier": "sks"}


@pytest.mark.parametrize(
    ("files", "kw", "match"),
    [
        ({"ok.png": png(), "broken.jpg": b"not an image at all"}, {}, r"broken\.jpg is not a decodable image"),
        ({"ok.png": png(), "tiny.png": png((16, 100))}, {}, r"tiny\.png is too small: 16x100"),
        (
            {"ok.png": png(), "ok2.png": png(seed=2)},
            {"minImages": 3},
            r"found 2 instance images in file://.*minImages=3",
        ),
        ({"readme.txt": b"hi"}, {}, r"no instance images .* under instanceImages.uri file://"),
        (
            {"a.png": png()},
            {"captions": True, "identifier": "sks"},
            r"caption file://.*a\.txt for instance image .*a\.png",
        ),
        (
            {"a.png": png(), "a.txt": b"a photo of a dog"},
            {"captions": True, "identifier": "sks"},
            r"caption .*a\.txt does not contain .*sks",
        ),
    ],
)
def test_bad_input_names_the_object(
    store: ObjectStore, tmp_path: Path, files: dict[str, bytes], kw: dict[str, object], match: str
) -> None:
    for name, data in files.items():
        put(store, tmp_path / "imgs", name, data)
    with pytest.raises(InvalidInputError, match=match):
        load_instance_examples(spec(tmp_path / "imgs", **kw), store, resolution=32)


def test_missing_prefix_and_missing_listed_file(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="nowhere"):
        load_instance_examples(spec(tmp_path / "nowhere"), store, resolution=32)
    ok = put(store, tmp_path, "ok.png", png())
    files_spec = InstanceImagesSpec(
        files=[ok, (tmp_path / "gone.png").as_uri()], prompt="a photo of sks dog", min_resolution=32
    )
    with pytest.raises(InvalidInputError, match=r"gone\.png does not exist"):
        load_instance_examples(files_spec, store, resolution=32)


def test_decompression_bomb_is_refused_before_decoding(store: ObjectStore, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("1", (9000, 8000)).save(buf, format="PNG")  # 72 Mpx, a few KB on disk
    put(store, tmp_path, "bomb.png", buf.getvalue())
    with pytest.raises(InvalidInputError, match=r"bomb\.png has too many pixels"):
        load_instance_examples(spec(tmp_path), store, resolution=32)


def test_captions_with_identifier_from_class_prompt(store: ObjectStore, tmp_path: Path) -> None:
    put(store, tmp_path, "a.png", png())
    put(store, tmp_path, "a.txt", b"sks dog  on the beach\n")
    (example,) = load_instance_examples(spec(tmp_path, captions=True), store, 32, class_prompt="a photo of dog")
    assert example.caption == "sks dog on the beach"


class FakeTokenizer:
    """A stand-in with the tokenizer call signature the Dataset uses (ids from character codes)."""

    model_max_length = 8

    def __call__(self, text: str, **_: object) -> object:
        ids = [ord(c) % 50 for c in text][: self.model_max_length]
        ids += [0] * (self.model_max_length - len(ids))

        class Out:
            input_ids = torch.tensor([ids])

        return Out()


def examples(n: int, size: tuple[int, int], caption: str) -> list[Example]:
    return [Example(f"mem://{caption}/{i}", Image.open(io.BytesIO(png(size, seed=i))), caption) for i in range(n)]


def test_dataset_is_deterministic_per_epoch_and_index() -> None:
    ds = DreamBoothDataset(examples(2, (48, 32), "x"), FakeTokenizer(), 32, crop=Crop.RANDOM, flip=True, seed=7)
    first = [ds[i]["instance"]["pixel_values"] for i in range(2)]
    again = DreamBoothDataset(examples(2, (48, 32), "x"), FakeTokenizer(), 32, crop=Crop.RANDOM, flip=True, seed=7)
    assert all(torch.equal(a, again[i]["instance"]["pixel_values"]) for i, a in enumerate(first))
    assert first[0].shape == (3, 32, 32)
    assert float(first[0].min()) >= -1.0
    assert float(first[0].max()) <= 1.0
    views = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        views.add(ds[0]["instance"]["pixel_values"].numpy().tobytes())
    assert len(views) > 2  # random crops and flips vary across epochs


def test_prior_batch_puts_instances_first() -> None:
    ds = DreamBoothDataset(examples(2, (32, 32), "inst"), FakeTokenizer(), 32, classes=examples(5, (32, 32), "klass"))
    assert len(ds) == 5
    batch = collate_fn([ds[0], ds[1], ds[2]])
    assert batch["num_instance"] == 3
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][2], ds[2]["instance"]["pixel_values"])  # index 2 -> instance 0
    assert torch.equal(batch["pixel_values"][3], ds[0]["class"]["pixel_values"])
    assert torch.equal(batch["input_ids"][0], FakeTokenizer()("inst").input_ids[0])
    assert torch.equal(batch["input_ids"][5], FakeTokenizer()("klass").input_ids[0])


def test_latent_and_text_caches_match_direct_encoding(tmp_path: Path) -> None:
    comps = load_components(BaseModelSpec(tiny=True), ObjectStore(), SHARED_MODELS)
    ds = DreamBoothDataset(examples(2, (40, 32), "a photo of sks dog"), comps.tokenizer, 32, flip=True)
    direct = ds[0]["instance"]
    assert ds.cache_latents(comps.vae) == 4  # 2 images x 2 flips
    assert ds.cache_text_embeddings(comps.text_encoder) == 1
    cached = ds[0]["instance"]
    assert set(cached) == {"latent_params", "prompt_embeds"}
    with torch.no_grad():
        expect = comps.vae.encode(direct["pixel_values"][None]).latent_dist.parameters[0]
        embeds = comps.text_encoder(direct["input_ids"][None])[0][0]
    torch.testing.assert_close(cached["latent_params"], expect)
    torch.testing.assert_close(cached["prompt_embeds"], embeds)
    batch = collate_fn([ds[0], ds[1]])
    assert batch["latent_params"].shape == (2, 8, 16, 16)
    random_ds = DreamBoothDataset(examples(1, (40, 32), "x"), comps.tokenizer, 32, crop=Crop.RANDOM)
    assert random_ds.cache_latents(comps.vae) == 0


def prepare_job(root: Path, crop: str, train_text_encoder: bool) -> JobConfig:
    return JobConfig.model_validate(
        {
            "instanceImages": {
                "uri": (root / "in").as_uri(),
                "prompt": "a photo of sks dog",
                "minResolution": 32,
                "crop": crop,
            },
            "priorPreservation": {"enabled": True, "classPrompt": "a photo of dog", "numImages": 3, "steps": 1},
            "training": {"resolution": 32, "trainTextEncoder": train_text_encoder},
            "output": {"uri": (root / "jobs" / "j").as_uri()},
        }
    )


def test_prepare_dataset_with_priors_and_caches(store: ObjectStore, tmp_path: Path) -> None:
    from dreambooth_trainer.prepare import prepare_dataset

    for i in range(2):
        put(store, tmp_path / "in", f"{i}.png", png((48, 40), seed=i))
    comps = load_components(BaseModelSpec(tiny=True), store, SHARED_MODELS)
    phases: list[str] = []
    barriers: list[int] = []
    cached = prepare_dataset(
        prepare_job(tmp_path, "center", False), comps, store, on_phase=phases.append, barrier=lambda: barriers.append(1)
    )
    assert (phases, barriers) == (["GeneratingPriors"], [1])
    assert len(cached) == 3  # max(2 instance, 3 class) items
    assert (tmp_path / "jobs" / "class-cache").is_dir()  # the default cache sits beside the output
    batch = collate_fn([cached[0], cached[2]])
    assert set(batch) == {"num_instance", "latent_params", "prompt_embeds"}
    assert batch["latent_params"].shape[0] == 4
    raw = prepare_dataset(prepare_job(tmp_path, "random", True), comps, store)
    assert set(collate_fn([raw[1]])) == {"num_instance", "pixel_values", "input_ids"}


def test_16_bit_grayscale_is_scaled_not_saturated(store: ObjectStore, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 48), 30000, dtype=np.uint16)).save(buf, format="PNG")  # about 46% gray
    put(store, tmp_path, "gray16.png", buf.getvalue())
    (example,) = load_instance_examples(spec(tmp_path), store, resolution=32)
    values = np.asarray(example.image)
    assert example.image.mode == "RGB"
    assert abs(int(values.min()) - 117) <= 1
    assert abs(int(values.max()) - 117) <= 1


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF"])
def test_only_jpeg_png_and_webp_are_decoded(store: ObjectStore, tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (10, 200, 10)).save(buf, format=fmt)
    put(store, tmp_path, "other.png", buf.getvalue())
    with pytest.raises(InvalidInputError, match=r"other\.png is not a decodable image"):
        load_instance_examples(spec(tmp_path), store, resolution=32)


def test_webp_is_decoded(store: ObjectStore, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (10, 200, 10)).save(buf, format="WEBP", lossless=True)
    put(store, tmp_path, "a.webp", buf.getvalue())
    (example,) = load_instance_examples(spec(tmp_path), store, resolution=32)
    assert example.image.getpixel((0, 0)) == (10, 200, 10)


def test_oversized_object_is_refused_before_it_is_read(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dreambooth_trainer import imageio

    big = put(store, tmp_path, "big.png", png((64, 64)))
    monkeypatch.setattr(imageio, "MAX_IMAGE_BYTES", 100)
    reads: list[str] = []

    def read_bytes(uri: str) -> bytes:
        reads.append(uri)
        return b""

    monkeypatch.setattr(store, "read_bytes", read_bytes)
    with pytest.raises(InvalidInputError, match=r"big\.png is too large"):
        load_instance_examples(spec(tmp_path), store, resolution=32)
    assert big not in reads


def test_a_rank_with_nothing_to_generate_does_not_move_the_models(store: ObjectStore, tmp_path: Path) -> None:
    """With the class set complete, the UNet stays where it is: "meta" as the device would break any move."""
    from dreambooth_trainer.prepare import prepare_dataset

    put(store, tmp_path / "in", "0.png", png((48, 40)))
    comps = load_components(BaseModelSpec(tiny=True), store, SHARED_MODELS)
    job = prepare_job(tmp_path, "center", False)
    job.training.cache_latents = False
    prepare_dataset(job, comps, store)  # fills the class-image cache on the CPU
    dataset = prepare_dataset(job, comps, store, device="meta")
    assert len(dataset) == 3
    assert {p.device.type for p in comps.unet.parameters()} == {"cpu"}


def test_generation_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    from dreambooth_api.config import MixedPrecision
    from dreambooth_trainer.prepare import generation_dtype

    assert generation_dtype(MixedPrecision.NO, "cuda") is None
    assert generation_dtype(MixedPrecision.BF16, "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert generation_dtype(MixedPrecision.FP16, "cuda:0") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert generation_dtype(MixedPrecision.BF16, torch.device("cuda")) is torch.float16

"""The pre-flight checks (trainer/preflight.py) on file:// storage, no servers: which buckets a job names, and each
check's message for a bad input. S3 itself, missing buckets and outages: tests/integration/test_trainer_preflight.py."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dreambooth_api.config import JobConfig
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.preflight import buckets, check_base_model, job_uris, run_checks
from dreambooth_trainer.storage import ObjectStore


def png(size: tuple[int, int] = (48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def config(tmp_path: Path, **changes: Any) -> JobConfig:
    doc: dict[str, Any] = {
        "baseModel": {"tiny": True},
        "instanceImages": {"uri": (tmp_path / "photos").as_uri(), "prompt": "a photo of sks dog", "minResolution": 32},
        "training": {"resolution": 32},
        "output": {"uri": (tmp_path / "out").as_uri()},
    }
    for key, value in changes.items():
        doc[key] = {**doc.get(key, {}), **value}
    return JobConfig.model_validate(doc)


def photos(tmp_path: Path, count: int = 2) -> None:
    (tmp_path / "photos").mkdir(exist_ok=True)
    for i in range(count):
        (tmp_path / "photos" / f"img{i}.png").write_bytes(png())


def test_buckets_are_every_s3_location_once_in_order() -> None:
    cfg = JobConfig.model_validate(
        {
            "baseModel": {"uri": "s3://models/sd15"},
            "instanceImages": {"files": ["s3://photos/a.png", "s3://photos/b.png"], "prompt": "a photo of sks dog"},
            "output": {"uri": "s3://out/job", "checkpointUri": "s3://ckpt/job"},
        }
    )
    assert job_uris(cfg) == [
        "s3://photos/a.png",
        "s3://photos/b.png",
        "s3://out/job",
        "s3://ckpt/job",
        "s3://models/sd15",
    ]
    assert buckets(cfg) == ["photos", "out", "ckpt", "models"]


def test_good_input_passes_and_names_what_was_checked(tmp_path: Path) -> None:
    photos(tmp_path)
    summary = run_checks(config(tmp_path), ObjectStore())
    uri = (tmp_path / "photos").as_uri()
    assert summary == (
        f"2 instance image(s) in {uri} decode; {(tmp_path / 'out').as_uri()} is writable; "
        "base model tiny (built from configs)"
    )
    assert list((tmp_path / "out").iterdir()) == []  # the probe was deleted


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("none", "no instance images (jpg, jpeg, png, webp) under instanceImages.uri"),
        ("corrupt", "instance image {photos}/bad.jpg is not a decodable image"),
        ("small", "instance image {photos}/tiny.png is too small: 8x8"),
    ],
)
def test_bad_images_are_named(tmp_path: Path, setup: str, message: str) -> None:
    (tmp_path / "photos").mkdir()
    if setup == "corrupt":
        photos(tmp_path)
        (tmp_path / "photos" / "bad.jpg").write_bytes(b"not an image at all")
    if setup == "small":
        (tmp_path / "photos" / "tiny.png").write_bytes(png((8, 8)))
    with pytest.raises(InvalidInputError) as err:
        run_checks(config(tmp_path), ObjectStore())
    assert message.format(photos=(tmp_path / "photos").as_uri()) in str(err.value)


def test_an_output_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    photos(tmp_path)
    (tmp_path / "out").write_text("a file where the output folder should be")
    with pytest.raises(InvalidInputError, match=rf"^output.uri {(tmp_path / 'out').as_uri()} is not writable: "):
        run_checks(config(tmp_path), ObjectStore())


def test_a_base_model_folder_needs_the_diffusers_parts(tmp_path: Path) -> None:
    cfg = config(tmp_path, baseModel={"tiny": False, "uri": (tmp_path / "sd").as_uri()})
    store = ObjectStore()
    with pytest.raises(InvalidInputError, match="is not a diffusers folder"):
        check_base_model(cfg.base_model, store)
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
        (tmp_path / "sd" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sd" / rel).write_text("{}")
    with pytest.raises(InvalidInputError, match=r"missing \['vae', 'text_encoder', 'tokenizer', 'scheduler'\]$"):
        check_base_model(cfg.base_model, store)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "sd" / part).mkdir()
        (tmp_path / "sd" / part / "config.json").write_text("{}")
    assert check_base_model(cfg.base_model, store).startswith(f"base model {(tmp_path / 'sd').as_uri()} (")

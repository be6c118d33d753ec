"""The pre-flight checks (trainer/preflight.py) on file:// storage, no servers: which buckets a job names, and each
check's message for a bad input. S3 itself, missing buckets and outages: tests/integration/test_trainer_preflight.py."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dreambooth_api.config import JobConfig
from dreambooth_api.evaluation import VLM_API_KEY_ENV
from dreambooth_api.exitcodes import ExitCode, InvalidInputError
from dreambooth_trainer.preflight import (
    VlmUnavailableError,
    buckets,
    check_base_model,
    check_vlm,
    job_uris,
    run_checks,
    vlm_uses,
)
from dreambooth_trainer.storage import ObjectStore
from tests.infra.fake_vlm import FakeVlm, Reply, error_reply, garbage_reply
from tests.infra.processes import free_port


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


@pytest.fixture(scope="module")
def vlm_server() -> Iterator[FakeVlm]:
    with FakeVlm() as server:
        yield server


@pytest.fixture
def vlm(vlm_server: FakeVlm) -> FakeVlm:
    vlm_server.reset()
    return vlm_server


def vlm_config(tmp_path: Path, base_url: str, model: str = "m", **vlm: Any) -> JobConfig:
    return config(
        tmp_path,
        instanceImages={"identifier": "sks", "captions": "auto"},
        vlm={"baseUrl": base_url, "model": model, **vlm},
    )


def test_the_vlm_is_checked_when_captions_are_auto(
    tmp_path: Path, vlm: FakeVlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos(tmp_path)
    monkeypatch.setenv(VLM_API_KEY_ENV, "sk-check\n")
    summary = run_checks(vlm_config(tmp_path, vlm.base_url), ObjectStore())
    assert summary.endswith(f"; VLM m at {vlm.base_url} answers")
    [request] = vlm.model_requests
    assert (request.path, request.headers["authorization"]) == ("/v1/models", "Bearer sk-check")
    assert vlm.requests == []  # no chat completion: nothing is captioned by the check


def test_the_judge_needs_the_vlm_too_and_a_job_without_either_is_not_probed(tmp_path: Path, vlm: FakeVlm) -> None:
    evaluation = {"enabled": True, "judge": True, "dinoModel": {"tiny": True}, "clipModel": {"tiny": True}}
    judged = config(tmp_path, evaluation=evaluation, vlm={"baseUrl": vlm.base_url, "model": "m"})
    assert vlm_uses(judged) == ["evaluation.judge"]
    assert check_vlm(judged) == f"VLM m at {vlm.base_url} answers"
    unused = config(tmp_path, vlm={"baseUrl": vlm.base_url, "model": "m"})
    assert check_vlm(unused) is None
    assert len(vlm.model_requests) == 1


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (error_reply(401, "Invalid API key"), "refused the API key (HTTP 401): Invalid API key"),
        (error_reply(403, "no access to this model"), "refused the API key (HTTP 403)"),
        (error_reply(404, "Not Found"), "has no /models (HTTP 404): is vlm.baseUrl the API's base URL, ending in /v1?"),
        (None, "does not serve vlm.model 'baidu/ernie-4.5-vl-424b-a47b' (it serves: m, baidu/ERNIE-4.5-VL-28B-A3B-PT)"),
    ],
    ids=["401", "403", "404", "unknown-model"],
)
def test_a_refused_key_or_an_unknown_model_is_invalid_input(
    tmp_path: Path, vlm: FakeVlm, reply: Reply | None, message: str
) -> None:
    if reply is not None:
        vlm.script_models(reply)
    cfg = vlm_config(tmp_path, vlm.base_url, model="baidu/ernie-4.5-vl-424b-a47b")
    with pytest.raises(InvalidInputError) as err:
        check_vlm(cfg)
    assert str(err.value).startswith(f"spec.vlm (for captions: auto): the VLM endpoint {vlm.base_url}")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (error_reply(503, "the model is loading"), "answered HTTP 503: the model is loading"),
        (error_reply(429, "slow down", headers={"Retry-After": "30"}), "answered HTTP 429: slow down"),
        (Reply(body={"object": "list", "data": []}, delay=3.0), "did not answer within the probe's timeout"),
        (garbage_reply(), "did not answer with a model list"),
    ],
    ids=["503", "429", "timeout", "garbage"],
)
def test_a_transient_fault_is_inconclusive(tmp_path: Path, vlm: FakeVlm, reply: Reply, message: str) -> None:
    vlm.script_models(reply)
    with pytest.raises(VlmUnavailableError) as err:
        check_vlm(vlm_config(tmp_path, vlm.base_url, timeoutSeconds=1))
    assert err.value.exit_code is ExitCode.RETRYABLE
    assert message in str(err.value)
    assert len(vlm.model_requests) == 1  # one try: the Job controller's backoff retries the check


def test_an_unreachable_endpoint_is_inconclusive_and_named(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(VlmUnavailableError, match=rf"the VLM endpoint {dead} is unreachable: "):
        check_vlm(vlm_config(tmp_path, dead))

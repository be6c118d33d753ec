"""The pre-flight input check (trainer/preflight.py) against the real S3 server: each kind of bad input fails with a
message naming the cause, good input passes and leaves nothing behind, and a storage outage is retryable (exit 11),
never taken for bad input. The last test runs the entry point the operator's `<job>-check` pod runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dreambooth_api.config import JobConfig, StorageSettings
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.preflight import PROBE_PREFIX, buckets, run_checks
from dreambooth_trainer.storage import ObjectStore, StorageError
from tests.infra.faultproxy import FaultProxy
from tests.infra.s3 import S3Server
from tests.integration.trainer_runs import put_images, tiny_job

MISSING = "no-such-bucket-preflight"


@pytest.fixture
def aws(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def bucket(s3: S3Server) -> str:
    name = s3.make_bucket()
    put_images(s3, name, "subject", count=3)
    return name


def store_for(s3: S3Server, endpoint: str | None = None) -> ObjectStore:
    return ObjectStore(StorageSettings(endpoint=endpoint or s3.endpoint, region=s3.region, addressing_style="path"))


def config(s3: S3Server, bucket: str, **changes: Any) -> JobConfig:
    doc = tiny_job(s3, bucket, "out/job")
    for key, value in changes.items():
        doc[key] = {**doc[key], **value}
    return JobConfig.model_validate(doc)


def check(s3: S3Server, cfg: JobConfig) -> str:
    return run_checks(cfg, store_for(s3))


def test_good_input_passes_and_leaves_nothing_behind(s3: S3Server, bucket: str, aws: None) -> None:
    summary = check(s3, config(s3, bucket))
    assert summary.startswith(f"3 instance image(s) in s3://{bucket}/subject decode; bucket(s) {bucket} exist;")
    assert f"s3://{bucket}/out/job is writable" in summary
    assert "base model tiny" in summary
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert sorted(keys) == [f"subject/img{i}.png" for i in range(3)]  # the probe is gone, nothing else written
    assert not any(PROBE_PREFIX in k for k in keys)


@pytest.mark.parametrize("where", ["instanceImages", "output"])
def test_a_missing_bucket_is_named(s3: S3Server, bucket: str, aws: None, where: str) -> None:
    if where == "instanceImages":
        cfg = config(s3, bucket, instanceImages={"uri": f"s3://{MISSING}/subject"})
    else:
        cfg = config(s3, bucket, output={"uri": f"s3://{MISSING}/out"})
    assert MISSING in buckets(cfg)
    with pytest.raises(InvalidInputError, match=rf"^bucket {MISSING} does not exist$"):
        check(s3, cfg)


def test_an_empty_prefix_is_named(s3: S3Server, bucket: str, aws: None) -> None:
    cfg = config(s3, bucket, instanceImages={"uri": f"s3://{bucket}/nobody/"})
    with pytest.raises(
        InvalidInputError, match=rf"no instance images .* under instanceImages.uri s3://{bucket}/nobody/"
    ):
        check(s3, cfg)


def test_a_corrupt_image_is_named(s3: S3Server, bucket: str, aws: None) -> None:
    s3.client().put_object(Bucket=bucket, Key="subject/broken.jpg", Body=b"not an image at all")
    with pytest.raises(InvalidInputError, match=rf"instance image s3://{bucket}/subject/broken.jpg is not a decodable"):
        check(s3, config(s3, bucket))


def test_an_image_below_min_resolution_is_named(s3: S3Server, bucket: str, aws: None) -> None:
    cfg = config(s3, bucket, instanceImages={"minResolution": 64})  # put_images makes 48x40 photos
    with pytest.raises(InvalidInputError, match=r"img0.png is too small: 48x40"):
        check(s3, cfg)


def test_a_base_model_folder_without_a_model_is_named(s3: S3Server, bucket: str, aws: None) -> None:
    s3.client().put_object(Bucket=bucket, Key="models/sd/unet/config.json", Body=b"{}")
    cfg = config(s3, bucket)
    cfg = cfg.model_copy(
        update={"base_model": cfg.base_model.model_copy(update={"tiny": False, "uri": f"s3://{bucket}/models/sd"})}
    )
    with pytest.raises(InvalidInputError, match=rf"baseModel.uri s3://{bucket}/models/sd is not a diffusers folder"):
        check(s3, cfg)
    s3.client().put_object(Bucket=bucket, Key="models/sd/model_index.json", Body=b"{}")
    with pytest.raises(InvalidInputError, match=r"missing \['vae', 'text_encoder', 'tokenizer', 'scheduler'\]$"):
        check(s3, cfg)


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3.endpoint, rate=0.0, seed=20) as p:
        yield p


@pytest.mark.parametrize("fault", ["error500", "down"])
def test_a_storage_outage_is_retryable_not_invalid_input(
    s3: S3Server, bucket: str, aws: None, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's budget, kept short
    if fault == "down":
        proxy.down = True
    else:
        proxy.kinds, proxy.rate = ("error500",), 1.0
    cfg = config(s3, bucket)
    with pytest.raises(StorageError, match=rf"object storage failed for bucket {bucket}") as info:
        run_checks(cfg, store_for(s3, proxy.endpoint))
    assert not isinstance(info.value, InvalidInputError), repr(proxy)
    assert proxy.requests >= 2, repr(proxy)  # botocore tried again before giving up


def run_entry_point(s3: S3Server, cfg: JobConfig, tmp_path: Path) -> tuple[int, dict[str, Any], str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_wire()))
    term = tmp_path / "termination-log"
    env = {**os.environ, **s3.env(), "TERMINATION_MESSAGE_PATH": str(term), "AWS_MAX_ATTEMPTS": "2"}
    cmd = [str(Path(sys.executable).parent / "dreambooth-train"), "--preflight", "--config", str(path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    return done.returncode, json.loads(term.read_text()), done.stdout + done.stderr


def test_the_entry_point_exits_with_the_contracts_codes(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    code, doc, logs = run_entry_point(s3, config(s3, bucket), tmp_path)
    assert code == 0, logs
    assert doc["status"] == "succeeded"
    assert doc["reason"] == "InputValid"
    assert doc["message"].startswith("3 instance image(s)")
    assert not (tmp_path / ".dreambooth").exists()  # nothing local either

    code, doc, logs = run_entry_point(s3, config(s3, bucket, output={"uri": f"s3://{MISSING}/x"}), tmp_path)
    assert code == 10, logs
    assert doc == {"status": "failed", "reason": "InvalidInput", "message": f"bucket {MISSING} does not exist"}
    assert s3.secret_key not in logs

"""ObjectStore against the real SeaweedFS S3 server: objects, listing past one page, multipart transfers, folders,
missing objects and refused credentials."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dreambooth_api.config import StorageSettings
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore, parse_uri
from tests.infra.s3 import S3Server

MIB = 1024 * 1024


def make_store(s3: S3Server, **kw: int) -> ObjectStore:
    settings = StorageSettings(endpoint=s3.endpoint, region=s3.region, addressing_style="path")
    return ObjectStore(settings, **kw)


def test_objects_round_trip(s3: S3Server, aws_env: None, tmp_path: Path) -> None:
    store = make_store(s3)
    bucket = s3.make_bucket()
    uri = f"s3://{bucket}/jobs/a/result.json"
    assert not store.exists(uri)
    store.write_bytes(uri, b'{"ok": true}')
    assert store.exists(uri)
    assert store.read_bytes(uri) == b'{"ok": true}'
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)
    with pytest.raises(ObjectNotFoundError, match=r"jobs/a/result\.json") as info:
        store.read_bytes(uri)
    assert info.value.uri == uri
    with pytest.raises(ObjectNotFoundError):
        store.download_file(uri, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(ObjectNotFoundError):
        store.read_bytes("s3://no-such-bucket-here/x")


def test_listing_past_one_page_and_delete_prefix(s3: S3Server, aws_env: None) -> None:
    store = make_store(s3)
    bucket = s3.make_bucket()
    uris = [f"s3://{bucket}/many/{i:05d}" for i in range(1003)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda u: store.write_bytes(u, b"x"), uris))
    store.write_bytes(f"s3://{bucket}/many-not/a", b"y")  # same string prefix, another folder
    listed = store.list(f"s3://{bucket}/many")
    assert [o.uri for o in listed] == uris
    assert {o.size for o in listed} == {1}
    assert store.delete_prefix(f"s3://{bucket}/many/") == 1003
    assert store.list(f"s3://{bucket}/many") == []
    assert store.exists(f"s3://{bucket}/many-not/a")


def test_multipart_upload_and_download(s3: S3Server, aws_env: None, tmp_path: Path) -> None:
    store = make_store(s3, multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    bucket = s3.make_bucket()
    data = os.urandom(12 * MIB + 123)
    local = tmp_path / "weights.bin"
    local.write_bytes(data)
    uri = f"s3://{bucket}/ckpt/weights.bin"
    store.upload_file(local, uri)
    head = s3.client().head_object(Bucket=bucket, Key=parse_uri(uri).key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # three parts: the transfer manager did a multipart upload
    store.download_file(uri, tmp_path / "back" / "weights.bin")
    assert (tmp_path / "back" / "weights.bin").read_bytes() == data
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["weights.bin"]  # no partial files left


def test_folders_round_trip(s3: S3Server, aws_env: None, tmp_path: Path) -> None:
    store = make_store(s3)
    bucket = s3.make_bucket()
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "config.json").write_text('{"a": 1}')
    written = store.upload_dir(src, f"s3://{bucket}/out/model/")
    assert written == [f"s3://{bucket}/out/model/model_index.json", f"s3://{bucket}/out/model/unet/config.json"]
    store.download_dir(f"s3://{bucket}/out/model", tmp_path / "dl")
    assert (tmp_path / "dl" / "unet" / "config.json").read_text() == '{"a": 1}'
    with pytest.raises(ObjectNotFoundError, match="out/nothing"):
        store.download_dir(f"s3://{bucket}/out/nothing", tmp_path / "dl2")


def test_wrong_credentials_are_a_permanent_error(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.make_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(InvalidInputError, match=f"s3://{bucket}/x"):
        make_store(s3).write_bytes(f"s3://{bucket}/x", b"1")


def test_keys_with_uri_characters_round_trip(s3: S3Server, aws_env: None) -> None:
    store = make_store(s3)
    bucket = s3.make_bucket()
    names = ["dog#1.jpg", "what?.jpg", "100%25.png"]
    for name in names:
        store.write_bytes(f"s3://{bucket}/photos/{name}", name.encode())
    listed = store.list(f"s3://{bucket}/photos")
    assert sorted(o.uri for o in listed) == sorted(f"s3://{bucket}/photos/{n}" for n in names)
    assert all(o.etag for o in listed)
    assert {store.read_bytes(o.uri) for o in listed} == {n.encode() for n in names}

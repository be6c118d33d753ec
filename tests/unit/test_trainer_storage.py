"""file:// object storage: the same interface the S3 backend has (tested against SeaweedFS in integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth_trainer.exitcodes import InvalidInputError
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore, join_uri, parse_uri


@pytest.fixture
def store() -> ObjectStore:
    return ObjectStore()


def test_write_read_exists_delete(store: ObjectStore, tmp_path: Path) -> None:
    uri = (tmp_path / "a" / "b.bin").as_uri()
    assert not store.exists(uri)
    store.write_bytes(uri, b"hello")
    assert store.exists(uri)
    assert store.read_bytes(uri) == b"hello"
    store.write_bytes(uri, b"again")
    assert store.read_bytes(uri) == b"again"
    # no temporary files are left beside the object
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)  # deleting a missing object is fine


def test_missing_object_raises_not_found_naming_uri(store: ObjectStore, tmp_path: Path) -> None:
    uri = (tmp_path / "nope.png").as_uri()
    with pytest.raises(ObjectNotFoundError, match=r"nope\.png") as info:
        store.read_bytes(uri)
    assert info.value.uri == uri
    assert isinstance(info.value, InvalidInputError)
    with pytest.raises(ObjectNotFoundError):
        store.download_file(uri, tmp_path / "x")
    with pytest.raises(ObjectNotFoundError):
        store.download_dir((tmp_path / "empty").as_uri(), tmp_path / "out")


def test_dirs_roundtrip_list_and_delete_prefix(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "w.safetensors").write_bytes(b"x" * 100)
    prefix = (tmp_path / "bucket" / "model").as_uri()
    written = store.upload_dir(src, prefix + "/")
    assert written == [f"{prefix}/model_index.json", f"{prefix}/unet/w.safetensors"]
    listed = store.list(prefix)
    assert [(o.uri, o.size) for o in listed] == [
        (f"{prefix}/model_index.json", 2),
        (f"{prefix}/unet/w.safetensors", 100),
    ]
    # a sibling with the same string prefix is not part of the folder
    store.write_bytes((tmp_path / "bucket" / "model2" / "f").as_uri(), b"1")
    assert len(store.list(prefix)) == 2
    out = tmp_path / "out"
    store.download_dir(prefix, out)
    assert (out / "unet" / "w.safetensors").read_bytes() == b"x" * 100
    assert store.delete_prefix(prefix) == 2
    assert store.list(prefix) == []
    assert store.exists((tmp_path / "bucket" / "model2" / "f").as_uri())


def test_upload_download_file(store: ObjectStore, tmp_path: Path) -> None:
    local = tmp_path / "f.bin"
    local.write_bytes(b"abc" * 1000)
    uri = (tmp_path / "store" / "deep" / "f.bin").as_uri()
    store.upload_file(local, uri)
    store.download_file(uri, tmp_path / "dl" / "g.bin")
    assert (tmp_path / "dl" / "g.bin").read_bytes() == b"abc" * 1000


def test_parse_and_join() -> None:
    assert parse_uri("s3://bkt/a/b.png").bucket == "bkt"
    assert parse_uri("s3://bkt/a/b.png").key == "a/b.png"
    assert parse_uri("file:///tmp/x").path == Path("/tmp/x")
    assert join_uri("s3://b/p/", "/model/", "x.json") == "s3://b/p/model/x.json"
    with pytest.raises(InvalidInputError, match="unsupported"):
        parse_uri("http://example.com/x")
    with pytest.raises(InvalidInputError):
        parse_uri("s3:///nobucket")

"""file:// object storage: the same interface the S3 backend has (tested against SeaweedFS in integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth_api.config import StorageSettings
from dreambooth_api.exitcodes import ExitCode, InvalidInputError, RetryableError
from dreambooth_trainer.storage import (
    MAX_ATTEMPTS,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    join_uri,
    parse_uri,
    retry_config,
)


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


@pytest.mark.parametrize("name", ["dog#1.jpg", "what?.jpg", "100%25.png", "a b.png", "x%.png"])
def test_s3_keys_are_taken_verbatim(name: str) -> None:
    parsed = parse_uri(f"s3://bkt/photos/{name}")
    assert (parsed.bucket, parsed.key) == ("bkt", f"photos/{name}")


@pytest.mark.parametrize("name", ["dog#1.jpg", "what?.jpg", "100%25.png", "a b.png", "x%.png"])
def test_file_names_with_uri_characters_round_trip(store: ObjectStore, tmp_path: Path, name: str) -> None:
    """What a listing returns reads back, and folders copy with the same names."""
    src = tmp_path / "src"
    src.mkdir()
    (src / name).write_bytes(b"img")
    prefix = (tmp_path / "bucket").as_uri()
    [uploaded] = store.upload_dir(src, prefix)
    assert (tmp_path / "bucket" / name).read_bytes() == b"img"
    [listed] = store.list(prefix)
    assert listed.uri == uploaded
    assert store.read_bytes(listed.uri) == b"img"
    assert store.exists(listed.uri)
    assert parse_uri((tmp_path / name).as_uri()).path == tmp_path / name
    store.download_dir(prefix, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]


@pytest.fixture
def no_aws_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def unreachable_store() -> ObjectStore:
    return ObjectStore(StorageSettings(endpoint="http://127.0.0.1:9", region="us-east-1"))


def test_missing_credentials_are_invalid_input_naming_the_uri(
    no_aws_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod without (or with half of) its credentials Secret fails at once instead of retrying."""
    with pytest.raises(InvalidInputError, match=r"s3://bkt/x\.png") as info:
        unreachable_store().read_bytes("s3://bkt/x.png")
    assert not isinstance(info.value, RetryableError)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "only-the-id")
    with pytest.raises(InvalidInputError, match=r"s3://bkt/y\.png") as info:
        unreachable_store().write_bytes("s3://bkt/y.png", b"1")
    assert not isinstance(info.value, RetryableError)


def test_invalid_request_parameters_are_invalid_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with pytest.raises(InvalidInputError, match=r"s3://bkt/") as info:
        unreachable_store().read_bytes("s3://bkt/")  # an empty key
    assert not isinstance(info.value, RetryableError)


def test_region_comes_from_settings_then_boto3_then_default(
    no_aws_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ObjectStore(StorageSettings(endpoint="http://127.0.0.1:9")).s3.meta.region_name == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert ObjectStore(StorageSettings(endpoint="http://127.0.0.1:9")).s3.meta.region_name == "eu-west-1"
    settings = StorageSettings(endpoint="http://127.0.0.1:9", region="ap-south-1")
    assert ObjectStore(settings).s3.meta.region_name == "ap-south-1"


def test_the_s3_client_retries_in_standard_mode_with_eight_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's retries are the trainer's: standard mode (5xx, SlowDown and other throttling, resets and
    timeouts, with exponential backoff and a retry quota), 8 attempts (the first included); AWS_RETRY_MODE and
    AWS_MAX_ATTEMPTS change them (botocore ignores those variables once a Config sets retries, so the trainer reads
    them)."""
    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    retries = unreachable_store().s3.meta.config.retries
    assert retries == {"mode": "standard", "total_max_attempts": MAX_ATTEMPTS}
    assert MAX_ATTEMPTS == 8
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert unreachable_store().s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 3}
    assert retry_config({"AWS_MAX_ATTEMPTS": ""}) == {"mode": "standard", "total_max_attempts": 8}
    for bad in ({"AWS_RETRY_MODE": "sometimes"}, {"AWS_MAX_ATTEMPTS": "many"}, {"AWS_MAX_ATTEMPTS": "0"}):
        with pytest.raises(InvalidInputError, match="AWS_"):
            retry_config(bad)


def test_a_storage_failure_is_retryable_with_reason_storage_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens on the endpoint: after its retries the read fails as StorageUnavailable (exit code 11)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(StorageError, match=r"s3://bkt/x\.png") as info:
        unreachable_store().read_bytes("s3://bkt/x.png")
    assert (info.value.exit_code, info.value.reason) == (ExitCode.RETRYABLE, "StorageUnavailable")

"""`dreambooth submit`'s input check (cli/preflight.py) on a stub S3 client: a missing bucket and a prefix without
images stop the submit with a message naming them; what cannot be checked from here is a note, not an error."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from dreambooth_cli.errors import ExitStatus, InputError
from dreambooth_cli.preflight import check_images


def client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadBucket")


class StubS3:
    """head_bucket and list_objects_v2 over `buckets` (name -> keys); `fail` is raised by every call."""

    def __init__(self, buckets: dict[str, list[str]], fail: Exception | None = None, truncated: bool = False) -> None:
        self.buckets, self.fail, self.truncated = buckets, fail, truncated
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def head_bucket(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("head_bucket", kw))
        if self.fail is not None:
            raise self.fail
        if kw["Bucket"] not in self.buckets:
            raise client_error(404, "404")
        return {}

    def list_objects_v2(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("list_objects_v2", kw))
        keys = [k for k in self.buckets[kw["Bucket"]] if k.startswith(kw["Prefix"])][: kw["MaxKeys"]]
        return {"Contents": [{"Key": k} for k in keys], "IsTruncated": self.truncated}


def spec(uri: str | None = None, files: list[str] | None = None) -> dict[str, Any]:
    images: dict[str, Any] = {"prompt": "a photo of sks dog"}
    if uri is not None:
        images["uri"] = uri
    if files is not None:
        images["files"] = files
    return {"instanceImages": images}


BUCKETS = {"b": ["photos/dog/a.JPG", "photos/dog/notes.txt", "photos/cat/readme.md", "photos/dogs/x.png"]}


def test_a_prefix_with_images_passes() -> None:
    stub = StubS3(BUCKETS)
    assert check_images(stub, spec("s3://b/photos/dog")) is None  # type: ignore[arg-type]
    assert stub.calls == [
        ("head_bucket", {"Bucket": "b"}),
        ("list_objects_v2", {"Bucket": "b", "Prefix": "photos/dog/", "MaxKeys": 1000}),  # a folder, as the trainer
    ]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (spec("s3://nope/photos/dog/"), "spec.instanceImages: bucket nope does not exist"),
        (spec(files=["s3://b/photos/dog/a.JPG", "s3://gone/x.png"]), "spec.instanceImages: bucket gone does not exist"),
        (spec("s3://b/photos/cat/"), "spec.instanceImages: no images (jpg, jpeg, png, webp) under s3://b/photos/cat/"),
        (spec("s3://b/photos/do"), "spec.instanceImages: no images (jpg, jpeg, png, webp) under s3://b/photos/do"),
    ],
)
def test_a_missing_bucket_or_an_empty_prefix_stops_the_submit(images: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError) as err:
        check_images(StubS3(BUCKETS), images)  # type: ignore[arg-type]
    assert err.value.message == message
    assert err.value.status == ExitStatus.INVALID_INPUT


@pytest.mark.parametrize(
    "stub",
    [
        StubS3(BUCKETS, fail=client_error(403, "403")),
        StubS3(BUCKETS, fail=NoCredentialsError()),
        StubS3(BUCKETS, fail=EndpointConnectionError(endpoint_url="http://s3.cluster.local:8333")),
        StubS3(BUCKETS, fail=client_error(503, "SlowDown")),
    ],
    ids=["forbidden", "no credentials", "endpoint unreachable", "throttled"],
)
def test_what_cannot_be_checked_from_here_is_a_note(stub: StubS3) -> None:
    note = check_images(stub, spec("s3://b/photos/cat/"))  # type: ignore[arg-type]
    assert note is not None
    assert note.startswith("could not check spec.instanceImages from here (")
    assert note.endswith("the operator checks it before training")


def test_more_objects_than_one_page_without_images_is_not_called_empty() -> None:
    assert check_images(StubS3(BUCKETS, truncated=True), spec("s3://b/photos/cat/")) is None  # type: ignore[arg-type]


def test_file_uris_are_not_checked() -> None:
    stub = StubS3({})
    assert check_images(stub, spec("file:///photos/dog/")) is None  # type: ignore[arg-type]
    assert stub.calls == []

"""Object storage behind one small interface: `s3://bucket/key` (boto3) and `file:///abs/path` URIs.

Every method takes full URIs. A missing object raises `ObjectNotFoundError(uri)`; a failure that outlasted the
retries raises `StorageError` (retryable, reason StorageUnavailable). S3 retries are botocore's
(`Config(retries=...)`: standard mode, `MAX_ATTEMPTS` attempts; `AWS_RETRY_MODE` and `AWS_MAX_ATTEMPTS` change
them) and large transfers go through boto3's transfer manager, which also retries a download whose body broke
off. botocore retries a request until its response head arrives, not the reading of its body: `read_bytes` reads a
body again when it broke off or came short of its Content-Length (botocore checks the length), and that is the
only retry by hand. `file://` writes go through a temporary file in the same folder and a rename, so readers never
see half a file.
"""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from dreambooth_api.config import StorageSettings
from dreambooth_api.exitcodes import InvalidInputError, RetryableError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

# Transfers above this size use multipart upload/download with several threads.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024
MAX_ATTEMPTS = 8
"""Attempts per request, the first one included (botocore's `total_max_attempts`; AWS_MAX_ATTEMPTS counts alike)."""
RETRY_MODES = ("standard", "adaptive", "legacy")


class ObjectNotFoundError(InvalidInputError):
    """The object (or prefix) does not exist. Permanent: the job's input names something that is not there."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"object not found: {uri}")
        self.uri = uri


class StorageError(RetryableError):
    """Object storage failed after botocore's retries (an outage, throttling, a network error)."""

    reason = "StorageUnavailable"


def retry_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """botocore's `retries` setting: standard mode with `MAX_ATTEMPTS` attempts (the first try included), unless
    `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` say otherwise (botocore itself ignores them once a Config sets retries)."""
    e = os.environ if env is None else env
    mode = e.get("AWS_RETRY_MODE") or "standard"
    if mode not in RETRY_MODES:
        raise InvalidInputError(f"AWS_RETRY_MODE={mode!r} is not one of {', '.join(RETRY_MODES)}")
    raw = e.get("AWS_MAX_ATTEMPTS") or str(MAX_ATTEMPTS)
    try:
        attempts = int(raw)
    except ValueError as err:
        raise InvalidInputError(f"AWS_MAX_ATTEMPTS={raw!r} is not an integer") from err
    if attempts < 1:
        raise InvalidInputError(f"AWS_MAX_ATTEMPTS={raw!r} must be at least 1")
    return {"mode": mode, "total_max_attempts": attempts}


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its full URI and its size in bytes."""

    uri: str
    size: int
    etag: str = ""
    """The S3 ETag, or the modification time in nanoseconds for file:// (a cheap change marker)."""


@dataclass(frozen=True)
class ParsedUri:
    scheme: str
    bucket: str
    key: str

    @property
    def path(self) -> Path:
        return Path("/" + self.key)


def parse_uri(uri: str) -> ParsedUri:
    """Split `s3://bucket/key` or `file:///abs/path` into scheme, bucket and key (the path without its leading /).

    S3 keys are taken verbatim (`#`, `?` and `%` are part of the key). File paths are percent-decoded, as
    `Path.as_uri()` encodes them; listings encode file names the same way, so listed URIs read back.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise InvalidInputError(f"unsupported URI scheme (want s3:// or file://): {uri}")
    host, _slash, path = rest.partition("/")
    if scheme == "s3":
        if not host:
            raise InvalidInputError(f"not an object-storage URI (no bucket): {uri}")
        return ParsedUri("s3", host, path)
    if scheme == "file":
        if host not in ("", "localhost"):
            raise InvalidInputError(f"file URIs must be absolute (file:///path): {uri}")
        return ParsedUri("file", "", unquote(path).lstrip("/"))
    raise InvalidInputError(f"unsupported URI scheme (want s3:// or file://): {uri}")


def join_uri(prefix: str, *parts: str) -> str:
    """Join a prefix URI and relative parts with single slashes."""
    out = prefix.rstrip("/")
    for part in parts:
        if part:
            out = f"{out}/{part.strip('/')}"
    return out


def _dir_prefix(uri: str) -> str:
    return uri.rstrip("/") + "/"


def child_uri(prefix_uri: str, rel: str) -> str:
    """The URI of the relative path `rel` under `prefix_uri` (percent-encoded for file://, verbatim for s3://)."""
    return join_uri(prefix_uri, quote(rel) if prefix_uri.startswith("file:") else rel)


def relative_path(prefix_uri: str, uri: str) -> str:
    """The path of `uri` (an object listed under `prefix_uri`) relative to the prefix, decoded for file://."""
    rel = uri[len(_dir_prefix(prefix_uri)) :]
    return unquote(rel) if uri.startswith("file:") else rel


class ObjectStore:
    """Reads and writes objects by URI. One instance may be shared by threads (the boto3 client is thread-safe)."""

    def __init__(
        self,
        settings: StorageSettings | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunksize: int = MULTIPART_CHUNK,
    ) -> None:
        self.settings = settings or StorageSettings()
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self._client: S3Client | None = None
        self._lock = threading.Lock()

    # ----- S3 plumbing -------------------------------------------------------------------------------
    @property
    def s3(self) -> S3Client:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    retries=retry_config(),  # type: ignore[arg-type]
                    s3={"addressing_style": self.settings.addressing_style},  # type: ignore[arg-type]
                    connect_timeout=10,
                    read_timeout=60,
                )
                session = boto3.session.Session()
                self._client = session.client(
                    "s3",
                    endpoint_url=self.settings.endpoint,
                    region_name=_region(session, self.settings.region),
                    config=config,
                )
            return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=8,
            # A download whose body breaks off is tried again as often as botocore tries a request.
            num_download_attempts=int(retry_config()["total_max_attempts"]),
        )

    @staticmethod
    def _is_missing(err: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(err, ClientError):
            return False
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket") or status == 404

    def _s3_error(self, err: Exception, uri: str) -> Exception:
        if self._is_missing(err):
            return ObjectNotFoundError(uri)
        from botocore.exceptions import (
            ClientError,
            NoCredentialsError,
            ParamValidationError,
            PartialCredentialsError,
        )

        if isinstance(err, (NoCredentialsError, PartialCredentialsError, ParamValidationError)):
            return InvalidInputError(f"object storage request for {uri} is invalid: {err}")

        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidBucketName"):
                return InvalidInputError(f"object storage refused {uri}: {code}")
        return StorageError(f"object storage failed for {uri}: {err}")

    # ----- single objects ----------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        p = parse_uri(uri)
        if p.scheme == "file":
            try:
                return p.path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
                raise ObjectNotFoundError(uri) from err
        attempts = int(retry_config()["total_max_attempts"])
        for attempt in range(1, attempts + 1):
            try:
                return self.s3.get_object(Bucket=p.bucket, Key=p.key)["Body"].read()
            except Exception as err:
                if attempt < attempts and _body_broke_off(err):
                    continue  # botocore retried the request, not the body: ask again
                raise self._s3_error(err, uri) from err
        raise AssertionError("unreachable")  # pragma: no cover

    def write_bytes(self, uri: str, data: bytes) -> None:
        p = parse_uri(uri)
        if p.scheme == "file":
            _atomic_write(p.path, lambda f: f.write(data))
            return
        try:
            self.s3.put_object(Bucket=p.bucket, Key=p.key, Body=data)
        except Exception as err:
            raise self._s3_error(err, uri) from err

    def upload_file(self, local: Path | str, uri: str) -> None:
        local = Path(local)
        p = parse_uri(uri)
        if p.scheme == "file":

            def copy(f: Any) -> None:
                with local.open("rb") as src:
                    shutil.copyfileobj(src, f, 1024 * 1024)

            _atomic_write(p.path, copy)
            return
        try:
            self.s3.upload_file(str(local), p.bucket, p.key, Config=self._transfer_config())
        except Exception as err:
            raise self._s3_error(err, uri) from err

    def download_file(self, uri: str, local: Path | str) -> None:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        p = parse_uri(uri)
        if p.scheme == "file":
            if not p.path.is_file():
                raise ObjectNotFoundError(uri)

            def copy(f: Any) -> None:
                with p.path.open("rb") as src:
                    shutil.copyfileobj(src, f, 1024 * 1024)

            _atomic_write(local, copy)
            return
        tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
        try:
            self.s3.download_file(p.bucket, p.key, str(tmp), Config=self._transfer_config())
            tmp.replace(local)
        except Exception as err:
            tmp.unlink(missing_ok=True)
            raise self._s3_error(err, uri) from err

    def exists(self, uri: str) -> bool:
        p = parse_uri(uri)
        if p.scheme == "file":
            return p.path.is_file()
        try:
            self.s3.head_object(Bucket=p.bucket, Key=p.key)
        except Exception as err:
            if self._is_missing(err):
                return False
            raise self._s3_error(err, uri) from err
        return True

    def delete(self, uri: str) -> None:
        """Delete one object; deleting a missing object is not an error."""
        p = parse_uri(uri)
        if p.scheme == "file":
            p.path.unlink(missing_ok=True)
            return
        try:
            self.s3.delete_object(Bucket=p.bucket, Key=p.key)
        except Exception as err:
            if not self._is_missing(err):
                raise self._s3_error(err, uri) from err

    # ----- prefixes ----------------------------------------------------------------------------------
    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every object under the prefix (recursively), sorted by URI. The prefix is a folder: `a/b` lists `a/b/*`."""
        return sorted(self._iter(prefix_uri), key=lambda o: o.uri)

    def _iter(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        p = parse_uri(prefix_uri)
        if p.scheme == "file":
            root = p.path
            if not root.is_dir():
                return
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    if name.startswith(".") and ".part-" in name:
                        continue  # an unfinished atomic write
                    full = Path(dirpath) / name
                    rel = full.relative_to(root).as_posix()
                    stat = full.stat()
                    yield ObjectInfo(child_uri(prefix_uri, rel), stat.st_size, str(stat.st_mtime_ns))
            return
        prefix = _dir_prefix(p.key) if p.key else ""
        try:
            paginator = self.s3.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=p.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    uri = f"s3://{p.bucket}/{obj['Key']}"
                    yield ObjectInfo(uri, int(obj.get("Size", 0)), str(obj.get("ETag", "")))
        except Exception as err:
            raise self._s3_error(err, prefix_uri) from err

    def delete_prefix(self, prefix_uri: str) -> int:
        """Delete every object under the prefix; returns how many were deleted."""
        p = parse_uri(prefix_uri)
        if p.scheme == "file":
            root = p.path
            if not root.is_dir():
                return 0
            n = sum(len(files) for _, _, files in os.walk(root))
            shutil.rmtree(root)
            return n
        objects = self.list(prefix_uri)
        for start in range(0, len(objects), 1000):
            chunk = objects[start : start + 1000]
            keys: builtins.list[ObjectIdentifierTypeDef] = [{"Key": parse_uri(o.uri).key} for o in chunk]
            try:
                self.s3.delete_objects(Bucket=p.bucket, Delete={"Objects": keys, "Quiet": True})
            except Exception as err:
                raise self._s3_error(err, prefix_uri) from err
        return len(objects)

    def upload_dir(self, local_dir: Path | str, prefix_uri: str) -> builtins.list[str]:
        """Upload every file under local_dir to prefix_uri/<relative path>; returns the URIs written."""
        local_dir = Path(local_dir)
        written = []
        for path in sorted(local_dir.rglob("*")):
            if path.is_file():
                rel = path.relative_to(local_dir).as_posix()
                uri = child_uri(prefix_uri, rel)
                self.upload_file(path, uri)
                written.append(uri)
        return written

    def download_dir(self, prefix_uri: str, local_dir: Path | str) -> builtins.list[Path]:
        """Download every object under prefix_uri into local_dir; raises ObjectNotFoundError when there is none."""
        local_dir = Path(local_dir)
        objects = self.list(prefix_uri)
        if not objects:
            raise ObjectNotFoundError(prefix_uri)
        out = []
        for obj in objects:
            rel = relative_path(prefix_uri, obj.uri)
            target = (local_dir / rel).resolve()
            if not target.is_relative_to(local_dir.resolve()):
                raise InvalidInputError(f"object key escapes the target folder: {obj.uri}")
            self.download_file(obj.uri, target)
            out.append(target)
        return out


def _body_broke_off(err: Exception) -> bool:
    """A response body that ended early or broke off while being read (botocore's length check, a reset)."""
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError

    return isinstance(err, IncompleteReadError | ResponseStreamingError | ReadTimeoutError | ProtocolError)


def _region(session: Any, configured: str | None) -> str:
    """The configured region, else boto3's (AWS_DEFAULT_REGION, the profile), else AWS_REGION, else us-east-1."""
    return configured or session.region_name or os.environ.get("AWS_REGION") or "us-east-1"


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.part-", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Copy instance images to their prefix, skipping those already there with the same content.

The planner is pure; the two destinations (a local folder for `run --local`, S3 for `submit`) are small adapters.
An S3 object is "the same" when its ETag is the file's MD5 (single-part uploads), or when its `sha256` user
metadata (which `submit` always sets) equals the file's SHA-256 (multipart uploads have other ETags).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dreambooth_cli.errors import InputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class LocalFile:
    name: str
    """The object name below the prefix (the file name)."""
    path: Path
    md5: str
    sha256: str
    size: int


@dataclass(frozen=True)
class RemoteObject:
    name: str
    etag: str | None = None
    sha256: str | None = None
    size: int | None = None


def digest_file(path: Path) -> tuple[str, str]:
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def collect_images(folder: Path) -> list[LocalFile]:
    """The images (and their .txt caption sidecars) directly in a folder, sorted by name."""
    if not folder.is_dir():
        raise InputError(f"{folder}: images folder not found")
    files = []
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if path.is_file() and (suffix in IMAGE_SUFFIXES or suffix == CAPTION_SUFFIX):
            md5, sha = digest_file(path)
            files.append(LocalFile(path.name, path, md5, sha, path.stat().st_size))
    if not any(f.path.suffix.lower() in IMAGE_SUFFIXES for f in files):
        raise InputError(f"{folder}: no images (jpg, jpeg, png, webp)")
    return files


def is_same(local: LocalFile, remote: RemoteObject) -> bool:
    if remote.sha256 is not None:
        return remote.sha256 == local.sha256
    if remote.etag is not None:
        etag = remote.etag.strip('"')
        return "-" not in etag and etag == local.md5
    return False


def plan_uploads(local: Iterable[LocalFile], remote: Mapping[str, RemoteObject]) -> list[LocalFile]:
    """The local files that are missing remotely or differ from the remote object of the same name."""
    return [f for f in local if f.name not in remote or not is_same(f, remote[f.name])]


def sync_to_folder(files: list[LocalFile], folder: Path) -> tuple[int, int]:
    """Copy files into a local folder (the file:// form of a prefix); returns (copied, skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    remote = {}
    for path in folder.iterdir():
        if path.is_file():
            _, sha = digest_file(path)
            remote[path.name] = RemoteObject(path.name, sha256=sha)
    todo = plan_uploads(files, remote)
    for f in todo:
        shutil.copyfile(f.path, folder / f.name)
    return len(todo), len(files) - len(todo)

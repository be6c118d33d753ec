"""The exported diffusers folder's completeness: its upload order and its manifest (docs/contracts.md).

`upload_model_folder` uploads every file of the folder except `model_index.json`, then `model_index.json` (so that a
folder with it is complete: diffusers and the sampling server take it as the mark of a model folder), then
`MANIFEST_NAME`, the list of the folder's files and sizes plus the training resolution. `check_model_folder` reads
the manifest back and refuses a folder of ours that lacks a file it lists, or has one of another size; a folder
without a manifest (a foreign diffusers folder, or one exported before manifests) is taken as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.storage import ObjectStore, child_uri, join_uri, relative_path

MODEL_INDEX: Final = "model_index.json"
MANIFEST_NAME: Final = "dreambooth-manifest.json"
MANIFEST_FORMAT: Final = "dreambooth-model/1"


class IncompleteModelError(InvalidInputError):
    """A model folder of ours whose manifest lists files that are missing or of another size."""


@dataclass(frozen=True)
class ModelFolder:
    """What `check_model_folder` found: the manifest (None for a foreign folder) and its training resolution."""

    manifest: dict[str, Any] | None
    resolution: int | None


def folder_manifest(local_dir: Path, resolution: int | None) -> dict[str, Any]:
    """The manifest of a local folder: every file (relative POSIX path -> size in bytes), the manifest excluded."""
    files = {
        p.relative_to(local_dir).as_posix(): p.stat().st_size
        for p in sorted(local_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    doc: dict[str, Any] = {"format": MANIFEST_FORMAT, "files": files}
    if resolution is not None:
        doc["resolution"] = resolution
    return doc


def upload_model_folder(store: ObjectStore, local_dir: Path, uri: str, resolution: int | None) -> list[str]:
    """Upload a diffusers folder: its parts, then `model_index.json`, then the manifest; returns the URIs written."""
    manifest = folder_manifest(local_dir, resolution)
    parts = [rel for rel in manifest["files"] if rel != MODEL_INDEX]
    last = [MODEL_INDEX] if MODEL_INDEX in manifest["files"] else []
    written = []
    for rel in [*parts, *last]:
        target = child_uri(uri, rel)
        store.upload_file(local_dir / rel, target)
        written.append(target)
    manifest_uri = join_uri(uri, MANIFEST_NAME)
    store.write_bytes(manifest_uri, json.dumps(manifest, indent=1, sort_keys=True).encode())
    written.append(manifest_uri)
    return written


def check_model_folder(store: ObjectStore, uri: str) -> ModelFolder:
    """Check a diffusers folder in storage against its manifest; raises IncompleteModelError naming what is wrong."""
    manifest_uri = join_uri(uri, MANIFEST_NAME)
    if not store.exists(manifest_uri):
        return ModelFolder(None, None)
    try:
        doc = json.loads(store.read_bytes(manifest_uri))
        files = {str(k): int(v) for k, v in doc["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise IncompleteModelError(f"model folder {uri}: unreadable {MANIFEST_NAME}: {err}") from err
    present = {relative_path(uri, o.uri): o.size for o in store.list(uri)}
    missing = sorted(rel for rel in files if rel not in present)
    wrong = sorted(rel for rel, size in files.items() if rel in present and present[rel] != size)
    if missing or wrong:
        problems = []
        if missing:
            problems.append(
                f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        if wrong:
            problems.append(f"wrong size {', '.join(wrong[:5])}")
        raise IncompleteModelError(
            f"model folder {uri} is incomplete ({'; '.join(problems)}; its {MANIFEST_NAME} lists {len(files)} files):"
            " export it again"
        )
    resolution = doc.get("resolution")
    return ModelFolder(doc, int(resolution) if isinstance(resolution, int) and resolution > 0 else None)

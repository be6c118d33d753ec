"""Where a metric model's files come from: a hub id, an object-storage folder, or a tiny model built from configs.

A hub id is left to transformers' `from_pretrained(id, revision=...)` with the trainer's hub cache
(`<cache>/hub`, shared with the base models). An object-storage folder is downloaded once per content into
`<cache>/metric-models/<key>`, where the key covers the URI and a digest of the folder's listing (sizes and ETags,
as `components.listing_digest` computes for base models), downloaded beside the target and renamed into place, so
that pods sharing the model cache never read a half-copied model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from dreambooth_api.evaluation import MetricModelSpec
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.components import download_folder, listing_digest
from dreambooth_trainer.evaluation.tiny import MetricKind, build_tiny_metric_model
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore, relative_path


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` is given: a hub id (with revision and cache folder) or a local folder."""

    location: str
    identity: str
    revision: str | None = None
    cache_dir: str | None = None


def resolve_metric_model(
    spec: MetricModelSpec, kind: MetricKind, cache_dir: Path, store: ObjectStore | None = None
) -> ModelSource:
    """The source of a metric model; object-storage folders are downloaded (once) and tiny models built."""
    cache_dir = Path(cache_dir)
    if spec.tiny:
        return ModelSource(str(build_tiny_metric_model(kind, cache_dir / "tiny")), spec.identity())
    if spec.uri:
        folder = fetch_model_folder(spec.uri, store or ObjectStore(), cache_dir)
        return ModelSource(str(folder), spec.identity())
    assert spec.id is not None
    return ModelSource(spec.id, spec.identity(), revision=spec.revision, cache_dir=str(cache_dir / "hub"))


def fetch_model_folder(uri: str, store: ObjectStore, cache_dir: Path) -> Path:
    """Download a model folder from object storage into the cache once per content; returns the local folder."""
    try:
        listed = {relative_path(uri, obj.uri): obj for obj in store.list(uri)}
    except ObjectNotFoundError as err:
        raise InvalidInputError(f"metric model {uri}: {err}") from err
    if "config.json" not in listed:
        raise InvalidInputError(f"metric model {uri} is not a transformers model folder (no config.json)")
    digest = listing_digest([(rel, obj.size, obj.etag) for rel, obj in listed.items()])
    key = hashlib.sha256(f"{uri}#{digest}".encode()).hexdigest()[:16]
    target = Path(cache_dir) / "metric-models" / key
    try:
        return download_folder({rel: obj.uri for rel, obj in listed.items()}, store, target, what=f"metric model {uri}")
    except ObjectNotFoundError as err:
        raise InvalidInputError(f"metric model {uri}: {err}") from err

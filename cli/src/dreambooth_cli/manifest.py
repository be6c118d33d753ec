"""Read and check a DreamBoothJob manifest before it is run locally or submitted.

Errors are single lines that name the file, the line (for YAML errors) or the field (for schema violations).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dreambooth_api import constants as api
from dreambooth_api import yamlio
from dreambooth_cli.errors import InputError
from dreambooth_cli.openapi import validate

CRD_ENV = "DREAMBOOTH_CRD"
"""Path of the DreamBoothJob CRD YAML, when the CLI runs outside a source checkout."""
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_yaml_documents(path: Path) -> list[Any]:
    """Every YAML document of a file; InputError for a missing file or invalid YAML (with line and column)."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read: {err}") from err
    try:
        return [doc for doc in yamlio.safe_load_all(text) if doc is not None]
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = err.problem or err.context or "syntax error"
        raise InputError(f"{path}{where}: invalid YAML: {problem}") from err
    except yaml.YAMLError as err:
        raise InputError(f"{path}: invalid YAML: {err}") from err


def load_job_manifest(path: Path) -> dict[str, Any]:
    """The one DreamBoothJob in a file, with its apiVersion, kind, name and spec checked."""
    docs = load_yaml_documents(path)
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == api.JOB_KIND]
    if not jobs:
        kinds = ", ".join(str(d.get("kind")) for d in docs if isinstance(d, dict)) or "nothing"
        raise InputError(f"{path}: expected a {api.JOB_KIND}, found {kinds}")
    if len(jobs) > 1:
        raise InputError(f"{path}: expected one {api.JOB_KIND}, found {len(jobs)}")
    job = jobs[0]
    errors = check_envelope(job)
    if errors:
        raise InputError(f"{path}: {'; '.join(errors)}")
    return job


def check_envelope(job: dict[str, Any]) -> list[str]:
    """apiVersion, metadata.name and spec: what every DreamBoothJob needs before any schema."""
    errors = []
    if job.get("apiVersion") != api.API_VERSION:
        errors.append(f"apiVersion: must be {api.API_VERSION}, got {job.get('apiVersion')!r}")
    metadata = job.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        errors.append("metadata.name: required field is missing")
    elif len(name) > 63 or not NAME_RE.match(name):
        errors.append(f"metadata.name: {name!r} must be a DNS label (lowercase letters, digits, '-'; at most 63)")
    if not isinstance(job.get("spec"), dict):
        errors.append("spec: required field is missing")
    return errors


@dataclass(frozen=True)
class SchemaSource:
    schema: dict[str, Any]
    path: Path


def _candidate_dirs(start: Path) -> list[Path]:
    dirs = []
    for base in (start, Path.cwd(), Path(__file__).resolve()):
        dirs.extend([base, *base.parents] if base.is_dir() else list(base.parents))
    return dirs


def find_crd_schema(near: Path) -> SchemaSource | None:
    """The openAPIV3Schema of the DreamBoothJob CRD: from $DREAMBOOTH_CRD, or crds/ of the enclosing checkout."""
    explicit = os.environ.get(CRD_ENV)
    files = [Path(explicit)] if explicit else []
    seen: set[Path] = set()
    for folder in _candidate_dirs(near.resolve()):
        crds = folder / "crds"
        if crds in seen or not crds.is_dir():
            continue
        seen.add(crds)
        files.extend(sorted(crds.glob("*.yaml")))
    for file in files:
        try:
            docs = list(yaml.safe_load_all(file.read_text()))
        except (OSError, yaml.YAMLError):
            continue
        for doc in docs:
            schema = _job_schema(doc)
            if schema is not None:
                return SchemaSource(schema, file)
    return None


def _job_schema(doc: Any) -> dict[str, Any] | None:
    if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
        return None
    spec = doc.get("spec", {})
    if spec.get("group") != api.GROUP or spec.get("names", {}).get("kind") != api.JOB_KIND:
        return None
    for version in spec.get("versions", []):
        if version.get("name") == api.VERSION:
            schema = version.get("schema", {}).get("openAPIV3Schema")
            return schema if isinstance(schema, dict) else None
    return None


def schema_errors(job: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Schema violations of the spec (metadata and status are the API server's business)."""
    spec_schema = schema.get("properties", {}).get("spec")
    if not isinstance(spec_schema, dict):
        return []
    return validate(job.get("spec"), spec_schema, "spec")


def check_schema(path: Path, job: dict[str, Any]) -> str:
    """Validate against the CRD schema when one is found; returns a note saying which check ran."""
    source = find_crd_schema(path.parent)
    if source is None:
        return "CRD schema not found (set DREAMBOOTH_CRD); the trainer validates the config"
    errors = schema_errors(job, source.schema)
    if errors:
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise InputError(f"{path}: schema violation (CRD schema {source.path.name}): {shown}")
    return f"validated against the CRD schema {source.path}"

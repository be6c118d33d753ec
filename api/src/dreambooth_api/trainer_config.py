"""DreamBoothJob -> the trainer's JobConfig wire dict (pure).

The trainer owns what training means: the sections ``baseModel``, ``instanceImages``, ``priorPreservation``,
``training`` and ``output`` are passed through unchanged (the trainer validates them again). The operator
owns ``spec.storage``; only its connection settings (endpoint, region, addressingStyle) reach the trainer.
Credentials never do: they reach the pod through ``secretKeyRef`` env vars.

The result is what the operator stores in the job's ConfigMap (key ``config.json``) and what
``dreambooth run --local`` feeds to the trainer. See docs/contracts.md (``DREAMBOOTH_CONFIG``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from dreambooth_api.config import JobConfig, StorageSettings

# Spec sections owned by the trainer's JobConfig, passed through as they are: its fields but the job's identity
# (from metadata) and storage (below).
_NOT_PASSED_THROUGH = {"name", "namespace", "storage"}
PASSTHROUGH_SECTIONS = tuple(f.alias or n for n, f in JobConfig.model_fields.items() if n not in _NOT_PASSED_THROUGH)
# The trainer's StorageSettings fields (camelCase); everything else under spec.storage (credentialsSecret, ...)
# stays out.
STORAGE_FIELDS = tuple(field.alias or name for name, field in StorageSettings.model_fields.items())
# The ConfigMap key that holds the JSON document.
CONFIG_KEY = "config.json"


def build_trainer_config(job: Mapping[str, Any]) -> dict[str, Any]:
    """Return the trainer's JobConfig (camelCase wire form) for a DreamBoothJob object.

    ``job`` is the custom resource as a plain dict (``metadata`` and ``spec``). Sections absent from the spec
    are left out so that the trainer's defaults apply. The input is never mutated.
    """
    metadata: Mapping[str, Any] = job.get("metadata") or {}
    spec: Mapping[str, Any] = job.get("spec") or {}
    config: dict[str, Any] = {}
    if metadata.get("name"):
        config["name"] = metadata["name"]
    if metadata.get("namespace"):
        config["namespace"] = metadata["namespace"]
    for section in PASSTHROUGH_SECTIONS:
        value = spec.get(section)
        if value is not None:
            config[section] = copy.deepcopy(value)
    storage: Mapping[str, Any] = spec.get("storage") or {}
    trainer_storage = {key: storage[key] for key in STORAGE_FIELDS if storage.get(key) is not None}
    if trainer_storage:
        config["storage"] = trainer_storage
    return config


def render_trainer_config(job: Mapping[str, Any]) -> str:
    """The JobConfig as canonical JSON (sorted keys, so equal jobs give byte-equal ConfigMaps)."""
    return json.dumps(build_trainer_config(job), sort_keys=True, separators=(",", ":"))

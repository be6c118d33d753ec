"""The run fingerprint: the settings that give a run's trainable state its shape and meaning.

Every manifest carries the fingerprint of the run that wrote it (`{"sha256", "fields"}`); a run resumes only a
checkpoint with its own fingerprint, or one without any (older trainers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dreambooth_api.config import JobConfig, Method


@dataclass(frozen=True)
class RunFingerprint:
    """The settings that give a run's trainable state its shape and meaning; only a checkpoint written with the
    same ones is resumed. Checkpoints without a fingerprint (older trainers) are accepted."""

    fields: Mapping[str, Any]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_wire(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "fields": dict(self.fields)}


def fingerprint_mismatch(stored: Any, expected: RunFingerprint) -> list[str] | None:
    """None when a manifest's `fingerprint` matches `expected`; else the names of the fields that differ (all of
    `expected`'s when the stored fields are unknown). Raises ValueError when `stored` is malformed."""
    if not isinstance(stored, dict) or not isinstance(stored.get("sha256"), str):
        raise ValueError(f"malformed fingerprint: {stored!r}")
    if stored["sha256"] == expected.sha256:
        return None
    fields = stored.get("fields")
    if not isinstance(fields, dict):
        return sorted(expected.fields)
    return sorted(k for k in set(fields) | set(expected.fields) if fields.get(k) != expected.fields.get(k))


def run_fingerprint(config: JobConfig) -> RunFingerprint:
    """What gives the trainable state its shape and meaning: the base model, the subject, the method and its
    adapters, what is trained, resolution, seed and optimizer. Not maxSteps, learning rate, validation,
    checkpoint cadence or output formats, which a resumed run may change."""
    t = config.training
    images = config.instance_images
    lora = t.lora_or_default() if t.method is Method.LORA else None
    return RunFingerprint(
        {
            "baseModel": config.base_model.cache_identity(),
            "instanceImages": images.uri if images.uri is not None else list(images.files or []),
            "instancePrompt": images.prompt,
            "method": t.method.value,
            "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "targets": lora.target_modules},
            "trainTextEncoder": t.train_text_encoder,
            "resolution": t.resolution,
            "seed": t.seed,
            "optimizer": t.optimizer.value,
        }
    )

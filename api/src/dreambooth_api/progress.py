"""The `/progress` document: what rank 0's trainer serves and the operator and the CLI read (docs/contracts.md).

One model for both sides: the trainer builds a `ProgressDocument` and serves `to_wire()`; the operator reads the
body back with `parse_progress`, which never raises on a bad document from a user-chosen image: it refuses bodies
over `MAX_PROGRESS_BYTES`, anything that is not a JSON object, and it drops (to None) numbers that are not finite or
have the wrong type, so that a `NaN` never reaches the API server.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

MAX_PROGRESS_BYTES: Final = 64 * 1024
"""The operator reads at most this much of a `/progress` body (the document is a few hundred bytes)."""


class TrainerPhase(StrEnum):
    """The trainer's own stage (`/progress` `phase`, the `dreambooth_trainer_phase` metric's label)."""

    INITIALIZING = "Initializing"
    GENERATING_PRIORS = "GeneratingPriors"
    TRAINING = "Training"
    CHECKPOINTING = "Checkpointing"
    EXPORTING = "Exporting"
    EVALUATING = "Evaluating"
    """After the export: sampling and scoring the trained model (spec.evaluation)."""
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    PREEMPTED = "Preempted"


RESUMED_PHASES: Final = frozenset(
    {
        TrainerPhase.TRAINING,
        TrainerPhase.CHECKPOINTING,
        TrainerPhase.EXPORTING,
        TrainerPhase.EVALUATING,
        TrainerPhase.SUCCEEDED,
    }
)
"""Phases a trainer reports only once it has restored its checkpoint (so its step is the resumed one)."""


class WireModel(BaseModel):
    """camelCase on the wire, unknown fields ignored (a newer trainer may add some)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def _finite(value: Any) -> float | None:
    """A finite number as float, else None (NaN, inf, bools, strings and other types are dropped)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    """A non-negative int, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return int(value)


class CheckpointInfo(WireModel):
    """The newest complete checkpoint the trainer wrote."""

    step: int
    uri: str = Field(max_length=1024)
    time: datetime | None = None


class ProgressDocument(WireModel):
    """`GET /progress` on rank 0."""

    phase: TrainerPhase | None = None
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    last_checkpoint: CheckpointInfo | None = None
    resumed_from: int | None = None
    """The checkpoint step this process resumed from (None: it started from step 0)."""

    @field_validator("loss", "lr", mode="before")
    @classmethod
    def _any_finite(cls, value: Any) -> float | None:
        return _finite(value)

    @field_validator("steps_per_second", "eta_seconds", mode="before")
    @classmethod
    def _non_negative(cls, value: Any) -> float | None:
        number = _finite(value)
        return number if number is not None and number >= 0 else None

    @field_validator("resumed_from", mode="before")
    @classmethod
    def _resumed(cls, value: Any) -> int | None:
        return _count(value)

    @field_validator("phase", mode="before")
    @classmethod
    def _phase(cls, value: Any) -> TrainerPhase | None:
        try:
            return TrainerPhase(value)
        except ValueError:
            return None

    @field_validator("last_checkpoint", mode="before")
    @classmethod
    def _checkpoint(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return None
        try:
            return CheckpointInfo.model_validate(value)
        except ValidationError:
            return None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object the trainer serves (every field present; null where unknown)."""
        return self.model_dump(mode="json", by_alias=True)


class ProgressError(ValueError):
    """A `/progress` body that cannot be used at all (too large, not JSON, not an object, no valid step)."""


def parse_progress(body: bytes | str | dict[str, Any]) -> ProgressDocument:
    """Read a `/progress` body. Bad optional fields become None; a body without a usable step raises ProgressError."""
    if isinstance(body, bytes | str):
        if len(body) > MAX_PROGRESS_BYTES:
            raise ProgressError(f"/progress body is over {MAX_PROGRESS_BYTES} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, 4300+ digit ints
            raise ProgressError(f"/progress is not JSON: {exc}") from exc
    else:
        data = body
    if not isinstance(data, dict):
        raise ProgressError("/progress did not return a JSON object")
    step, total = _count(data.get("step")), _count(data.get("totalSteps"))
    if step is None:
        raise ProgressError("/progress has no non-negative integer step")
    cleaned = {**data, "step": step, "totalSteps": total or 0}
    try:
        return ProgressDocument.model_validate(cleaned)
    except ValidationError as exc:  # only possible for fields without a lenient validator
        raise ProgressError(f"/progress is malformed: {exc.errors()[0]['msg']}") from exc

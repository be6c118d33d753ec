"""Progress policy: rank 0's /progress (a typed `ProgressDocument`) -> status.progress, and the newest checkpoint.

A sample is taken only when it is from the current attempt's rank 0 and does not go back, except after a restart
(a replacement pod resumes from a checkpoint behind the last step seen): then the steps done again are counted
once, against the checkpoint the new pod resumed from. The document's numbers are finite by construction
(`parse_progress` drops NaN, infinities and wrong types), so nothing here can put a non-finite number in the status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from dreambooth_api.constants import JobConditionType, Reason
from dreambooth_api.job import CheckpointRef, Progress
from dreambooth_api.job import progress_text as format_progress
from dreambooth_api.progress import RESUMED_PHASES
from dreambooth_operator import podstate
from dreambooth_operator.observed import Attempt
from dreambooth_operator.plan import PlanBuilder

STAGE_MAX = 64


LOSS_DIGITS = 4
"""Significant digits of status.progress.loss (the LOSS column); metrics and the report keep the raw value."""


def rounded(value: float | None, digits: int = LOSS_DIGITS) -> float | None:
    """`value` to `digits` significant digits (0.9842754602432251 -> 0.9843), None as it is."""
    return None if value is None else float(f"{value:.{digits}g}")


def record_checkpoint(b: PlanBuilder, raw: Mapping[str, Any]) -> None:
    """A complete checkpoint the trainer reported (camelCase, as on the wire): the newest one wins."""
    try:
        ref = CheckpointRef.model_validate(raw)
    except ValidationError:
        return
    prev = b.status.last_checkpoint
    if prev is not None and prev.step > ref.step:
        return
    b.status.last_checkpoint = ref
    b.condition(JobConditionType.CHECKPOINTED, True, Reason.CHECKPOINT_WRITTEN, f"step {ref.step} at {ref.uri}")


def take_sample(b: PlanBuilder, attempt: Attempt) -> None:
    """Take rank 0's /progress when it is from this attempt and does not go back (except after a restart)."""
    sample = b.obs.progress
    if sample is None or sample.attempt != attempt.number:
        return
    if not any(podstate.pod_uid(p) == sample.pod_uid for p in attempt.pods):
        return
    doc = sample.document
    step = doc.step
    prev = b.status.progress
    restarted = (
        prev is not None
        and prev.updated_at is not None
        and sample.pod_start is not None
        and sample.pod_start > prev.updated_at
    )
    if prev is not None and step < prev.step and not restarted:
        return
    if prev is not None and prev.updated_at is not None and sample.at < prev.updated_at:
        return
    # totalSteps 0 means unknown (absent or malformed): keep the total seen before.
    total = doc.total_steps or (prev.total_steps if prev else 0)
    stage = doc.phase.value[:STAGE_MAX] if doc.phase is not None else None
    if restarted and prev is not None and doc.phase is not None and doc.phase not in RESUMED_PHASES:
        # A restarted pod that has not restored its checkpoint yet: keep the last step seen before the restart (and
        # its time, so that the restart is still recognised), and show the new pod's stage.
        b.status.progress = prev.model_copy(update={"stage": stage, "steps_per_second": None})
        return
    redone = prev.steps_redone if prev is not None else 0
    if restarted and prev is not None:
        # The restarted pod's first sample since it resumed: the steps between its checkpoint (resumedFrom; null
        # when it started from step 0; absent from older trainers, which count as resumed at this step) and the
        # last step seen before the restart.
        resumed = doc.resumed_from if "resumed_from" in doc.model_fields_set else step
        redone += max(0, prev.step - (resumed or 0))
    progress = Progress(
        step=step,
        steps_redone=redone,
        total_steps=total,
        loss=rounded(doc.loss),
        steps_per_second=doc.steps_per_second,
        eta_seconds=doc.eta_seconds,
        stage=stage,
        updated_at=sample.at,
    )
    if prev is None or progress.model_copy(update={"updated_at": prev.updated_at}) != prev:
        # A sample that only says "still here" (an initializing pod polled again) keeps the status as it is: a write
        # that changes nothing but its time would print the same `kubectl get -w` row again.
        b.status.progress = progress
    b.status.progress_text = format_progress(step, total)
    if doc.last_checkpoint is not None:
        record_checkpoint(b, doc.last_checkpoint.model_dump(by_alias=True))

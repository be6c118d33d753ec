"""Pod-spec-change policy: an attempt whose pods cannot start (image pull or scheduling) is replaced by one built
from the new spec once the user changes spec.podTemplate or spec.storage, without counting a failure. No pod has
run, so no training is lost; a running attempt keeps its pods and the change applies from the next attempt."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dreambooth_api.constants import ANNOTATION_POD_SPEC_HASH, JobConditionType, JobPhase, Reason
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator.builders import pod_spec_hash
from dreambooth_operator.observed import Attempt
from dreambooth_operator.plan import Action, ActionKind, Plan, PlanBuilder


def changed(batch_job: Mapping[str, Any], spec: DreamBoothJobSpec) -> bool:
    """The user changed spec.podTemplate or spec.storage since this attempt was created (unknown: unchanged)."""
    built = (batch_job.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_POD_SPEC_HASH)
    return built is not None and built != pod_spec_hash(spec)


def replace_stuck_attempt(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt, stuck: str | None) -> Plan | None:
    """The plan that replaces the attempt when its pods cannot start (`stuck`: why) and the pod settings changed;
    else None."""
    if stuck is None or attempt.batch_job is None or not changed(attempt.batch_job, spec):
        return None
    b.actions.append(Action(ActionKind.DELETE_BATCH_JOB, name=attempt.name))
    b.status.attempt += 1
    message = (
        f"spec.podTemplate or spec.storage changed while attempt {b.status.attempt - 1} could not start ({stuck}); "
        f"starting attempt {b.status.attempt} with the new settings"
    )
    b.phase(JobPhase.PENDING, message)
    b.condition(JobConditionType.RUNNING, False, Reason.POD_SPEC_CHANGED, message)
    b.requeue.append(1.0)
    return b.plan()

"""Validity policy: a spec the operator cannot run (validation.py collects every reason) fails the job at once,
before any child exists; a valid one gets the Valid condition."""

from __future__ import annotations

from dreambooth_api.constants import JobConditionType, Reason
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator.plan import PlanBuilder
from dreambooth_operator.validation import validate


def valid_spec(b: PlanBuilder) -> DreamBoothJobSpec | None:
    """The parsed spec, or None once the job has failed as InvalidSpec."""
    job = b.obs.job
    errors = validate(job)
    if errors:
        message = "; ".join(errors)
        b.condition(JobConditionType.VALID, False, Reason.INVALID_SPEC, message)
        b.fail(Reason.INVALID_SPEC, message)
        return None
    spec = DreamBoothJobSpec.model_validate(job.get("spec") or {})
    b.condition(JobConditionType.VALID, True, Reason.SPEC_VALID, "the spec is valid")
    return spec

"""Restrictions policy: a job whose pods would break the operator's restrictions (allowed images, ServiceAccounts,
priority classes: restrictions.py) fails at once with reason PolicyViolation and a message naming each rule, and
its running attempt, if any, is stopped. Checked at every reconcile: a podTemplate change, or stricter settings,
apply to running jobs too."""

from __future__ import annotations

from dreambooth_api.constants import JobConditionType, Reason
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator import podstate
from dreambooth_operator.plan import Action, ActionKind, PlanBuilder
from dreambooth_operator.restrictions import violations


def allowed(b: PlanBuilder, spec: DreamBoothJobSpec) -> bool:
    """False once the job has failed as PolicyViolation."""
    broken = violations(spec.pod_template, b.obs.rules)
    if not broken:
        return True
    message = "; ".join(broken)
    b.actions.extend(
        Action(ActionKind.DELETE_BATCH_JOB, name=str(j["metadata"]["name"]))
        for j in b.obs.batch_jobs
        if not podstate.is_deleting(j)
    )
    b.condition(JobConditionType.VALID, False, Reason.POLICY_VIOLATION, message)
    b.fail(Reason.POLICY_VIOLATION, message)
    return False

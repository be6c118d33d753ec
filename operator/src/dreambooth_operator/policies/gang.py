"""Gang restart policy: when any rank of a multi-node attempt fails, the whole gang stops and the next attempt
starts (it resumes from the latest checkpoint). A preemption is never counted against backoffLimit; any other
failure is, and past it the job fails."""

from __future__ import annotations

from dreambooth_api.constants import JobConditionType, JobPhase, Reason
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator.observed import Attempt
from dreambooth_operator.plan import Plan, PlanBuilder
from dreambooth_operator.policies import failure, ttl


def restart(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt) -> Plan | None:
    """The plan when a rank of a multi-node attempt failed (not while the user suspends the job), else None."""
    if spec.resources.nodes <= 1 or spec.run_policy.suspend:
        return None
    gang = failure.gang_failure(attempt.pods)
    if gang is None:
        return None
    b.stop_attempt(attempt)
    if gang.kind is failure.FailureKind.PREEMPTED:
        b.status.restarts.preemptions += 1
        reason = Reason.PREEMPTED
    else:
        b.status.restarts.failures += 1
        reason = Reason.RETRYING
        if failure.exceeds_backoff(b.status.restarts.failures, spec.run_policy.backoff_limit):
            b.fail(
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"{b.status.restarts.failures} failures exceeded backoffLimit {spec.run_policy.backoff_limit}: "
                f"{gang.message}",
            )
            return ttl.finish(b)
    b.status.attempt += 1
    message = f"attempt {b.status.attempt - 1}: {gang.message}; restarting the gang as attempt {b.status.attempt}"
    b.phase(JobPhase.PENDING, message)
    b.condition(JobConditionType.RUNNING, False, reason, message)
    b.requeue.append(1.0)
    return b.plan()

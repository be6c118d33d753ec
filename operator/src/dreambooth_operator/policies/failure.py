"""Failure policy: classify a failed training pod; invalid input ends the job whatever the number of nodes; a
single-node job's failures are retried by the Job controller within backoffLimit, and its failed batch Job fails
the job. (A multi-node gang's failures restart the whole gang: policies/gang.py.)"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dreambooth_api.constants import Reason
from dreambooth_api.exitcodes import ExitCode
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator import podstate
from dreambooth_operator.observed import Attempt
from dreambooth_operator.plan import PlanBuilder


class FailureKind(StrEnum):
    INVALID_INPUT = "InvalidInput"
    """Exit code 10: permanent, the job fails at once."""
    PREEMPTED = "Preempted"
    """Disrupted (DisruptionTarget) or exit code 12: restart, never counted against backoffLimit."""
    RETRYABLE = "Retryable"
    """Any other failure: restart while failures stay within backoffLimit."""


def classify(pod: Mapping[str, Any]) -> FailureKind | None:
    """How a pod failed, or None while it has not failed (yet)."""
    code = podstate.exit_code(pod)
    if podstate.is_disrupted(pod) or code == ExitCode.PREEMPTED:
        return FailureKind.PREEMPTED
    if code == ExitCode.INVALID_INPUT:
        return FailureKind.INVALID_INPUT
    if podstate.pod_phase(pod) == "Failed" or (code is not None and code != 0):
        return FailureKind.RETRYABLE
    return None


@dataclass(frozen=True)
class GangFailure:
    """The first failure in one attempt of a multi-node gang."""

    kind: FailureKind
    pod: Mapping[str, Any]

    @property
    def message(self) -> str:
        name = self.pod.get("metadata", {}).get("name", "?")
        rank = podstate.pod_rank(self.pod)
        detail = podstate.termination_message(self.pod).get("message") or ""
        code = podstate.exit_code(self.pod)
        what = {
            FailureKind.PREEMPTED: "was preempted",
            FailureKind.INVALID_INPUT: "found invalid input",
            FailureKind.RETRYABLE: f"failed (exit code {code})" if code is not None else "failed",
        }[self.kind]
        text = f"rank {rank} (pod {name}) {what}"
        return f"{text}: {detail}" if detail else text


# Deciding first: invalid input ends the job; then a preemption, since a rank that loses its peer crashes on
# the broken collective (exit 11) and that crash must not use up a retry.
_SEVERITY = {FailureKind.INVALID_INPUT: 0, FailureKind.PREEMPTED: 1, FailureKind.RETRYABLE: 2}


def gang_failure(pods: list[Mapping[str, Any]]) -> GangFailure | None:
    """The failure that ends an attempt of a gang: any rank failed or was disrupted.

    When any rank was disrupted (DisruptionTarget or exit 12), the attempt was preempted, whatever its peers'
    exit codes; only invalid input outranks that.
    """
    failures = [GangFailure(kind, pod) for pod in pods if (kind := classify(pod)) is not None]
    if not failures:
        return None
    return min(failures, key=lambda f: (_SEVERITY[f.kind], podstate.pod_rank(f.pod) or 0))


def exceeds_backoff(failures: int, backoff_limit: int) -> bool:
    """True when `failures` retryable failures are more than the job may retry."""
    return failures > backoff_limit


def count_job_failures(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt) -> None:
    """Single-node jobs: the Job controller retries failed pods; its failed count is the job's failure count."""
    if attempt.batch_job is not None and spec.resources.nodes == 1:
        b.status.restarts.failures = max(b.status.restarts.failures, podstate.job_failed_count(attempt.batch_job))


def invalid_input(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt) -> bool:
    """True once a rank exited with INVALID_INPUT: the job fails at once with the trainer's message (a gang's
    other ranks are stopped; a single-node Job is failed by its podFailurePolicy)."""
    invalid = next((p for p in attempt.pods if classify(p) is FailureKind.INVALID_INPUT), None)
    if invalid is None:
        return False
    message = podstate.termination_message(invalid)
    detail = message.get("message") or "the trainer rejected its input"
    if spec.resources.nodes > 1:
        b.stop_attempt(attempt)
    diverged = message.get("reason") == Reason.LOSS_DIVERGED
    b.fail(Reason.LOSS_DIVERGED if diverged else Reason.INVALID_INPUT, str(detail))
    return True


def batch_job_failed(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt) -> bool:
    """True once the attempt's batch Job failed (its backoffLimit or its own deadline): the job fails too."""
    finished = podstate.job_finished(attempt.batch_job) if attempt.batch_job is not None else None
    if finished is None or finished[0] != "Failed":
        return False
    reason = str(finished[1].get("reason") or "")
    message = str(finished[1].get("message") or "the batch Job failed")
    if reason == "DeadlineExceeded":
        b.fail(Reason.DEADLINE_EXCEEDED, message)
    else:
        b.fail(
            Reason.BACKOFF_LIMIT_EXCEEDED,
            f"{b.status.restarts.failures} failures exceeded backoffLimit {spec.run_policy.backoff_limit}: {message}",
        )
    return True

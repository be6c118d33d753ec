"""Failure policy: classify a failed training pod, and decide what a gang failure means."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dreambooth_api.exitcodes import ExitCode
from dreambooth_operator import podstate


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

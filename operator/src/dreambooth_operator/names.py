"""Deterministic names of a DreamBoothJob's children.

Every child name is ``<job name>-<suffix>``. The pod hostname of an Indexed Job is ``<batch job name>-<index>``
and must be a DNS label (at most 63 characters), so the job name has to leave room for the longest suffix:
validation (see ``validation.py``) rejects names that do not.
"""

from __future__ import annotations

import re

DNS_LABEL_MAX = 63
# The longest attempt and completion index the names are checked for (attempt 999, rank 999).
MAX_ATTEMPT_DIGITS = 3
MAX_INDEX_DIGITS = 3
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def configmap_name(job_name: str) -> str:
    return f"{job_name}-config"


def service_name(job_name: str) -> str:
    """The headless Service that gives the pods their ``<hostname>.<subdomain>`` DNS names."""
    return f"{job_name}-workers"


def network_policy_name(job_name: str) -> str:
    """The NetworkPolicy that admits traffic to the job's pods (networkpolicies.py)."""
    return f"{job_name}-network"


def batch_job_name(job_name: str, attempt: int) -> str:
    """The batch Job of one gang attempt: a restart creates a new Job with the next attempt number."""
    return f"{job_name}-a{attempt}"


def preflight_job_name(job_name: str) -> str:
    """The batch Job of the pre-flight input check, run once before the first attempt (preflight_builders.py)."""
    return f"{job_name}-check"


def evaluation_job_name(job_name: str) -> str:
    """The batch Job that evaluates a succeeded job's exported model again, on request (evaluate_builders.py)."""
    return f"{job_name}-eval"


def pod_hostname(job_name: str, attempt: int, index: int) -> str:
    """The hostname the Job controller gives the pod of completion index ``index``."""
    return f"{batch_job_name(job_name, attempt)}-{index}"


def master_address(job_name: str, attempt: int) -> str:
    """Rank 0's DNS name inside the namespace: ``<batch job>-0.<service>``."""
    return f"{pod_hostname(job_name, attempt, 0)}.{service_name(job_name)}"


def longest_child_label(job_name: str) -> str:
    """The longest DNS label derived from ``job_name`` (checked against 63 characters)."""
    hostname = f"{job_name}-a{'9' * MAX_ATTEMPT_DIGITS}-{'9' * MAX_INDEX_DIGITS}"
    children = (service_name(job_name), configmap_name(job_name), network_policy_name(job_name))
    return max((hostname, *children, preflight_job_name(job_name), evaluation_job_name(job_name)), key=len)


def max_job_name_length() -> int:
    return DNS_LABEL_MAX - (len(longest_child_label("")))

"""Pure readers of observed pod and batch Job state (plain dicts as the API returns them)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from dreambooth_operator.layout import CONTAINER_NAME, RANK_LABEL
from dreambooth_operator.redact import redact

IMAGE_PULL_REASONS: Final = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable"}
)
TERMINAL_POD_PHASES: Final = frozenset({"Succeeded", "Failed"})


def _status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("status") or {}


def pod_uid(pod: Mapping[str, Any]) -> str:
    return str(pod.get("metadata", {}).get("uid", ""))


def pod_rank(pod: Mapping[str, Any]) -> int | None:
    labels = pod.get("metadata", {}).get("labels") or {}
    value = labels.get(RANK_LABEL)
    annotations = pod.get("metadata", {}).get("annotations") or {}
    value = value if value is not None else annotations.get(RANK_LABEL)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def pod_phase(pod: Mapping[str, Any]) -> str:
    return str(_status(pod).get("phase") or "Pending")


def is_terminal(pod: Mapping[str, Any]) -> bool:
    return pod_phase(pod) in TERMINAL_POD_PHASES


def is_active(pod: Mapping[str, Any]) -> bool:
    """Not finished yet (running, pending, or terminating)."""
    return not is_terminal(pod)


def has_condition(obj: Mapping[str, Any], type_: str, status: str = "True") -> bool:
    return any(c.get("type") == type_ and c.get("status") == status for c in _status(obj).get("conditions") or [])


def condition(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in _status(obj).get("conditions") or [] if c.get("type") == type_), None)


def is_disrupted(pod: Mapping[str, Any]) -> bool:
    """Evicted or preempted (the DisruptionTarget condition that the podFailurePolicy ignores)."""
    return has_condition(pod, "DisruptionTarget")


def trainer_state(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for cs in _status(pod).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER_NAME:
            return cs.get("state") or {}
    return {}


def terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    term = trainer_state(pod).get("terminated")
    return term if isinstance(term, Mapping) else None


def exit_code(pod: Mapping[str, Any]) -> int | None:
    term = terminated(pod)
    if term is None or term.get("exitCode") is None:
        return None
    return int(term["exitCode"])


def termination_message(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's termination message (docs/contracts.md): JSON, or plain text under "message"; its text
    redacted of anything that looks like a credential (a crash's message is the log tail: FallbackToLogsOnError)."""
    term = terminated(pod)
    raw = (term or {}).get("message") or ""
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        return {"message": redact(raw.strip()[-1024:])}
    if not isinstance(doc, dict):
        return {"message": redact(str(doc))}
    return {k: redact(v) if isinstance(v, str) else v for k, v in doc.items()}


def waiting_reason(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    waiting = trainer_state(pod).get("waiting")
    if isinstance(waiting, Mapping) and waiting.get("reason"):
        return str(waiting["reason"]), str(waiting.get("message") or "")
    return None


def image_pull_failure(pod: Mapping[str, Any]) -> str | None:
    """The message when the trainer image cannot be pulled."""
    waiting = waiting_reason(pod)
    if waiting and waiting[0] in IMAGE_PULL_REASONS:
        return f"{waiting[0]}: {waiting[1]}".rstrip(": ")
    return None


def unschedulable(pod: Mapping[str, Any]) -> str | None:
    """The scheduler's message when the pod cannot be placed."""
    cond = condition(pod, "PodScheduled")
    if cond and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
        return str(cond.get("message") or "no node fits the pod")
    return None


def is_running(pod: Mapping[str, Any]) -> bool:
    return pod_phase(pod) == "Running" and not pod.get("metadata", {}).get("deletionTimestamp")


def pod_ip(pod: Mapping[str, Any]) -> str | None:
    ip = _status(pod).get("podIP")
    return str(ip) if ip else None


def job_finished(batch_job: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """("Complete" | "Failed", condition) once the batch Job has finished."""
    for type_ in ("Complete", "Failed"):
        cond = condition(batch_job, type_)
        if cond and cond.get("status") == "True":
            return type_, cond
    return None


def job_suspended(batch_job: Mapping[str, Any]) -> bool:
    return bool((batch_job.get("spec") or {}).get("suspend"))


def job_failed_count(batch_job: Mapping[str, Any]) -> int:
    return int(_status(batch_job).get("failed") or 0)


def job_count(batch_job: Mapping[str, Any], counter: str) -> int:
    """One of the Job controller's status counters (active, ready, succeeded, failed); 0 when absent."""
    value = _status(batch_job).get(counter)
    return value if isinstance(value, int) and value > 0 else 0


def is_deleting(obj: Mapping[str, Any]) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def deletion_time(obj: Mapping[str, Any]) -> datetime | None:
    """metadata.deletionTimestamp: the deletion request's time plus its grace period (when the object should be
    gone); None when not deleting."""
    return parse_time(obj.get("metadata", {}).get("deletionTimestamp"))


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid in the object's controller ownerReference, or None without one."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return next((str(r.get("uid")) for r in refs if isinstance(r, Mapping) and r.get("controller")), None)


def parse_time(value: Any) -> datetime | None:
    """A Kubernetes timestamp (RFC 3339, ``Z`` suffix) as an aware datetime; None when absent or malformed."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None

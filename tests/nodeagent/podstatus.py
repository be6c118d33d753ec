"""Pure pod status building: container records -> ``status`` (phase, conditions, container statuses).

The pod worker keeps one ``ContainerRecord`` per container and calls ``build_status`` whenever something changes;
the agent patches the result with a strategic merge patch, so conditions that others own (``DisruptionTarget``
from the Eviction API, ``PodScheduled`` from the scheduler) are kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

CONTAINER_ID_SCHEME = "nodeagent://"


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Waiting:
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Running:
    started_at: datetime


@dataclass(frozen=True)
class Terminated:
    exit_code: int
    reason: str
    started_at: datetime
    finished_at: datetime
    message: str = ""
    signal: int | None = None


State = Waiting | Running | Terminated


@dataclass
class ContainerRecord:
    name: str
    image: str
    state: State = field(default_factory=lambda: Waiting("ContainerCreating"))
    last_state: Terminated | None = None
    restart_count: int = 0
    ready: bool = False
    container_id: str = ""


LOST_MESSAGE = "The container could not be located when the pod was terminated"


def lost(now: datetime) -> Terminated:
    """The state the kubelet reports for a container it cannot find when the pod ends."""
    return Terminated(137, "ContainerStatusUnknown", now, now, LOST_MESSAGE)


def exit_reason(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


def exit_code_of(returncode: int) -> int:
    """Popen's returncode (negative for a signal) as the container exit code (128 + signal, like runc)."""
    return 128 - returncode if returncode < 0 else returncode


def state_dict(state: State | None) -> dict[str, Any]:
    if state is None:
        return {}
    if isinstance(state, Waiting):
        waiting: dict[str, Any] = {"reason": state.reason}
        if state.message:
            waiting["message"] = state.message
        return {"waiting": waiting}
    if isinstance(state, Running):
        return {"running": {"startedAt": rfc3339(state.started_at)}}
    terminated: dict[str, Any] = {
        "exitCode": state.exit_code,
        "reason": state.reason,
        "startedAt": rfc3339(state.started_at),
        "finishedAt": rfc3339(state.finished_at),
    }
    if state.message:
        terminated["message"] = state.message
    if state.signal is not None:
        terminated["signal"] = state.signal
    return {"terminated": terminated}


def container_status(record: ContainerRecord) -> dict[str, Any]:
    status: dict[str, Any] = {
        "name": record.name,
        "image": record.image,
        "imageID": record.image,
        "ready": record.ready,
        "started": isinstance(record.state, Running),
        "restartCount": record.restart_count,
        "state": state_dict(record.state),
        "lastState": state_dict(record.last_state),
    }
    if record.container_id:
        status["containerID"] = CONTAINER_ID_SCHEME + record.container_id
    return status


def pod_phase(
    init: Sequence[ContainerRecord], main: Sequence[ContainerRecord], *, initialized: bool, terminal: bool
) -> str:
    """The phase, like the kubelet's ``getPhase`` for the cases the agent produces.

    ``terminal`` means the worker will start no container again: then the pod Succeeded when every main container
    exited 0, and Failed otherwise (including a failed init container, or processes killed on deletion).
    """
    if terminal:
        if not initialized:
            return "Failed"
        ok = all(isinstance(c.state, Terminated) and c.state.exit_code == 0 for c in main)
        return "Succeeded" if ok and main else "Failed"
    if not initialized:
        return "Pending"
    for c in main:
        if isinstance(c.state, Running | Terminated) or c.last_state is not None:
            return "Running"
    return "Pending"


def _condition(
    ctype: str, ok: bool, previous: Mapping[str, Mapping[str, Any]], now: datetime, reason: str = "", message: str = ""
) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(ctype)
    since = before.get("lastTransitionTime") if before and before.get("status") == status else None
    # None, not absent: a strategic merge patch merges conditions by type, and null removes a stale reason/message.
    return {
        "type": ctype,
        "status": status,
        "lastTransitionTime": since or rfc3339(now),
        "reason": reason or None,
        "message": message or None,
    }


def build_conditions(
    init: Sequence[ContainerRecord],
    main: Sequence[ContainerRecord],
    *,
    initialized: bool,
    phase: str,
    previous: Sequence[Mapping[str, Any]],
    now: datetime,
) -> list[dict[str, Any]]:
    """The conditions the kubelet owns; ``previous`` keeps ``lastTransitionTime`` stable while a status holds."""
    prev = {c["type"]: c for c in previous}
    terminal = phase in ("Succeeded", "Failed")
    pending_init = [c.name for c in init if not (isinstance(c.state, Terminated) and c.state.exit_code == 0)]
    unready = [c.name for c in main if not c.ready]
    init_msg = f"containers with incomplete status: [{' '.join(pending_init)}]" if not initialized else ""
    ready_reason, ready_msg = "", ""
    if terminal:
        ready_reason = "PodCompleted"
    elif unready:
        ready_reason, ready_msg = "ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]"
    all_ready = not unready and not terminal
    init_reason = "PodCompleted" if terminal and initialized else ("ContainersNotInitialized" if init_msg else "")
    return [
        _condition("PodReadyToStartContainers", not terminal, prev, now),
        _condition("Initialized", initialized, prev, now, init_reason, init_msg),
        _condition("Ready", all_ready, prev, now, ready_reason, ready_msg),
        _condition("ContainersReady", all_ready, prev, now, ready_reason, ready_msg),
        _condition("PodScheduled", True, prev, now),
    ]


def build_status(
    init: Sequence[ContainerRecord],
    main: Sequence[ContainerRecord],
    *,
    initialized: bool,
    terminal: bool,
    pod_ip: str,
    host_ip: str,
    start_time: datetime,
    previous_conditions: Sequence[Mapping[str, Any]],
    now: datetime,
    reason: str = "",
    message: str = "",
) -> dict[str, Any]:
    """The ``status`` the agent reports for a pod."""
    phase = pod_phase(init, main, initialized=initialized, terminal=terminal)
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": build_conditions(
            init, main, initialized=initialized, phase=phase, previous=previous_conditions, now=now
        ),
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": rfc3339(start_time),
        "containerStatuses": [container_status(c) for c in main],
    }
    if init:
        status["initContainerStatuses"] = [container_status(c) for c in init]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status


def termination_message(
    file_text: str, log_tail: str, *, policy: str, exit_code: int, limit: int = 4096, log_limit: int = 2048
) -> str:
    """The container's termination message: the file (at most 4 KiB), or the log tail under ``FallbackToLogsOnError``
    when the file is empty and the container failed (at most 80 lines and 2 KiB, as the kubelet does)."""
    message = file_text[:limit]
    if not message.strip() and policy == "FallbackToLogsOnError" and exit_code != 0:
        lines = log_tail.splitlines(keepends=True)[-80:]
        message = "".join(lines)[-log_limit:]
    return message

"""Pod status building of the test node agent: phase, conditions, container statuses, termination messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.nodeagent.podstatus import (
    ContainerRecord,
    Running,
    Terminated,
    Waiting,
    build_status,
    container_status,
    exit_code_of,
    pod_phase,
    termination_message,
)

T0 = datetime(2026, 11, 27, 0, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=5)


def running(name: str = "main", *, ready: bool = False) -> ContainerRecord:
    return ContainerRecord(name, "img", Running(T0), ready=ready)


def exited(code: int, name: str = "main") -> ContainerRecord:
    return ContainerRecord(name, "img", Terminated(code, "Completed" if code == 0 else "Error", T0, T1))


def waiting(reason: str = "ContainerCreating", name: str = "main") -> ContainerRecord:
    return ContainerRecord(name, "img", Waiting(reason))


def crash_looping() -> ContainerRecord:
    record = waiting("CrashLoopBackOff")
    record.last_state = Terminated(1, "Error", T0, T1)
    record.restart_count = 1
    return record


@pytest.mark.parametrize(
    ("init", "main", "initialized", "terminal", "phase"),
    [
        ([waiting("PodInitializing", "i")], [waiting("PodInitializing")], False, False, "Pending"),
        ([exited(0, "i")], [waiting()], True, False, "Pending"),
        ([], [waiting("CreateContainerConfigError")], True, False, "Pending"),
        ([], [running()], True, False, "Running"),
        ([], [running(), exited(0, "b")], True, False, "Running"),
        ([], [crash_looping()], True, False, "Running"),
        ([], [exited(0), exited(0, "b")], True, True, "Succeeded"),
        ([], [exited(0), exited(1, "b")], True, True, "Failed"),
        ([], [exited(143)], True, True, "Failed"),
        ([exited(4, "i")], [waiting("PodInitializing")], False, True, "Failed"),
    ],
)
def test_pod_phase(
    init: list[ContainerRecord], main: list[ContainerRecord], initialized: bool, terminal: bool, phase: str
) -> None:
    assert pod_phase(init, main, initialized=initialized, terminal=terminal) == phase


def conditions_of(status: dict[str, object]) -> dict[str, tuple[str, str | None]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}  # type: ignore[attr-defined]


def status(
    main: list[ContainerRecord],
    *,
    init: list[ContainerRecord] | None = None,
    initialized: bool = True,
    terminal: bool = False,
    previous: list[dict[str, object]] | None = None,
    now: datetime = T1,
) -> dict[str, object]:
    return build_status(
        init or [],
        main,
        initialized=initialized,
        terminal=terminal,
        pod_ip="127.10.0.2",
        host_ip="127.0.0.1",
        start_time=T0,
        previous_conditions=previous or [],
        now=now,
    )


def test_ready_pod_status() -> None:
    result = status([running(ready=True)])
    assert result["phase"] == "Running"
    assert (result["podIP"], result["podIPs"]) == ("127.10.0.2", [{"ip": "127.10.0.2"}])
    assert (result["hostIP"], result["hostIPs"]) == ("127.0.0.1", [{"ip": "127.0.0.1"}])
    assert result["startTime"] == "2026-11-27T00:00:00Z"
    assert conditions_of(result) == {
        "PodReadyToStartContainers": ("True", None),
        "Initialized": ("True", None),
        "Ready": ("True", None),
        "ContainersReady": ("True", None),
        "PodScheduled": ("True", None),
    }
    assert "initContainerStatuses" not in result


def test_unready_container_is_named_in_the_ready_condition() -> None:
    result = status([running("a", ready=True), running("b")])
    ready = next(c for c in result["conditions"] if c["type"] == "Ready")  # type: ignore[attr-defined]
    assert (ready["status"], ready["reason"]) == ("False", "ContainersNotReady")
    assert ready["message"] == "containers with unready status: [b]"


def test_pending_init_containers_are_named_in_initialized() -> None:
    result = status([waiting("PodInitializing")], init=[exited(0, "a"), running("b")], initialized=False)
    init = next(c for c in result["conditions"] if c["type"] == "Initialized")  # type: ignore[attr-defined]
    assert (init["status"], init["reason"]) == ("False", "ContainersNotInitialized")
    assert init["message"] == "containers with incomplete status: [b]"
    assert [s["name"] for s in result["initContainerStatuses"]] == ["a", "b"]  # type: ignore[attr-defined]


def test_terminal_pod_is_not_ready_with_reason_pod_completed() -> None:
    result = status([exited(0)], terminal=True)
    assert result["phase"] == "Succeeded"
    assert conditions_of(result)["Ready"] == ("False", "PodCompleted")
    assert conditions_of(result)["PodReadyToStartContainers"] == ("False", None)


def test_transition_time_is_kept_while_a_condition_holds() -> None:
    first = status([running(ready=True)], now=T0)
    later = status([running(ready=True)], previous=first["conditions"], now=T1)  # type: ignore[arg-type]
    assert later["conditions"] == first["conditions"]
    flipped = status([running()], previous=first["conditions"], now=T1)  # type: ignore[arg-type]
    ready = next(c for c in flipped["conditions"] if c["type"] == "Ready")  # type: ignore[attr-defined]
    assert ready["lastTransitionTime"] == "2026-11-27T00:00:05Z"


def test_container_status_of_a_restarted_container() -> None:
    record = crash_looping()
    record.container_id = "uid-main-1"
    result = container_status(record)
    assert result["state"] == {"waiting": {"reason": "CrashLoopBackOff"}}
    assert result["lastState"]["terminated"]["exitCode"] == 1
    assert result["lastState"]["terminated"]["finishedAt"] == "2026-11-27T00:00:05Z"
    assert (result["restartCount"], result["started"], result["ready"]) == (1, False, False)
    assert result["containerID"] == "nodeagent://uid-main-1"


def test_terminated_state_carries_message_and_signal() -> None:
    record = ContainerRecord("m", "img", Terminated(143, "Error", T0, T1, message='{"status":"preempted"}', signal=15))
    terminated = container_status(record)["state"]["terminated"]
    assert terminated["message"] == '{"status":"preempted"}'
    assert (terminated["exitCode"], terminated["signal"], terminated["reason"]) == (143, 15, "Error")


@pytest.mark.parametrize(("returncode", "exit_code"), [(0, 0), (10, 10), (-15, 143), (-9, 137)])
def test_exit_code_of_a_signalled_process(returncode: int, exit_code: int) -> None:
    assert exit_code_of(returncode) == exit_code


@pytest.mark.parametrize(
    ("file_text", "policy", "exit_code", "expected"),
    [
        ('{"ok": true}', "File", 0, '{"ok": true}'),
        ("", "File", 1, ""),
        ("", "FallbackToLogsOnError", 1, "line 79\nline 80\n"),
        ("", "FallbackToLogsOnError", 0, ""),
        ("from file", "FallbackToLogsOnError", 1, "from file"),
    ],
)
def test_termination_message(file_text: str, policy: str, exit_code: int, expected: str) -> None:
    logs = "".join(f"line {i}\n" for i in range(1, 81))
    message = termination_message(file_text, logs, policy=policy, exit_code=exit_code, log_limit=16)
    assert message == expected


def test_termination_message_limits() -> None:
    assert len(termination_message("x" * 10000, "", policy="File", exit_code=0)) == 4096
    logs = "".join(f"{i}\n" for i in range(200))
    fallback = termination_message("", logs, policy="FallbackToLogsOnError", exit_code=2)
    assert fallback.splitlines() == [str(i) for i in range(120, 200)]

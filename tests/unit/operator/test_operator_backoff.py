"""The periodic check's back-off (handlers/loop.py): the pure schedule `idle_interval`, the job's idle test
`pods_wait`, and how the loop applies them (requeues, errors and activity still win)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from dreambooth_operator.handlers import loop
from dreambooth_operator.handlers.loop import IDLE_JITTER, LoopKind, Pass, idle_interval, pods_wait, run_loop
from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.settings import OperatorSettings

KEY = ("ns", "cat")
LOG = logging.getLogger("test")


# --- the schedule -------------------------------------------------------------------------------------------


def test_an_object_that_may_change_is_checked_at_the_base_interval() -> None:
    assert idle_interval(12.0, 0, 300.0) == 12.0
    assert idle_interval(12.0, -3, 300.0, spread=0.9) == 12.0  # no jitter on the base interval either


def test_each_idle_pass_doubles_the_interval_up_to_the_ceiling() -> None:
    assert [idle_interval(12.0, n, 300.0) for n in range(1, 7)] == [24.0, 48.0, 96.0, 192.0, 300.0, 300.0]


def test_a_long_idle_time_stays_at_the_ceiling() -> None:
    assert idle_interval(12.0, 10_000, 300.0) == 300.0


def test_a_ceiling_below_the_base_never_shortens_the_base_interval() -> None:
    assert idle_interval(12.0, 3, 5.0) == 12.0


def test_jitter_lengthens_a_backed_off_interval_by_at_most_its_fraction() -> None:
    assert idle_interval(12.0, 1, 300.0, spread=0.5) == pytest.approx(24.0 * (1 + IDLE_JITTER * 0.5))
    assert idle_interval(12.0, 9, 300.0, spread=1.0) == pytest.approx(300.0 * (1 + IDLE_JITTER))
    assert idle_interval(12.0, 9, 300.0, spread=7.0) == pytest.approx(300.0 * (1 + IDLE_JITTER))  # clamped
    assert idle_interval(12.0, 9, 300.0, spread=-1.0) == 300.0


# --- which jobs are idle ------------------------------------------------------------------------------------


def pod(phase: str | None = None, scheduled: str | None = None, deleting: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase is not None:
        status["phase"] = phase
    if scheduled is not None:
        status["conditions"] = [{"type": "PodScheduled", "status": scheduled}]
    meta: dict[str, Any] = {"name": "p"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": status}


def test_a_job_without_pods_or_with_pods_waiting_for_a_node_is_idle() -> None:
    assert pods_wait([])
    assert pods_wait([pod()])  # just created: no status yet
    assert pods_wait([pod("Pending", scheduled="False")])  # unschedulable: the binding will be an event


def test_finished_pods_are_idle() -> None:
    assert pods_wait([pod("Succeeded", scheduled="True"), pod("Failed", scheduled="True")])


@pytest.mark.parametrize(
    "active",
    [
        pod("Pending", scheduled="True"),  # on a node: pulling, starting
        pod("Running", scheduled="True"),  # its /progress is polled
        pod("Unknown", scheduled="True"),
        pod("Pending", scheduled="False", deleting=True),
        pod("Succeeded", scheduled="True", deleting=True),
    ],
)
def test_a_pod_on_a_node_or_being_deleted_keeps_the_job_active(active: dict[str, Any]) -> None:
    assert not pods_wait([pod("Pending"), active])


# --- the loop ------------------------------------------------------------------------------------------------


class Stopped:
    """Stands in for kopf's DaemonStopped: false until `stop()`, and awaitable."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def stop(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


def make_state(interval: float, ceiling: float) -> OperatorState:
    poller = ProgressPoller(concurrency=1, timeout_seconds=1, interval_seconds=10, port=1)
    settings = OperatorSettings(reconcile_interval_seconds=interval, idle_reconcile_max_seconds=ceiling)
    return OperatorState(settings=settings, api=None, metrics=OperatorMetrics(), poller=poller)


def run_passes(monkeypatch: pytest.MonkeyPatch, results: list[Pass | Exception], spread: float = 0.0) -> list[float]:
    """Run the loop over `results` (one per pass; an exception is raised by that pass) and return the timeout of
    each wait between passes (the wait itself is replaced: it records and returns at once)."""
    state = make_state(interval=12.0, ceiling=100.0)
    stopped = Stopped()
    waits: list[float] = []
    left = list(results)

    async def record(wake: asyncio.Event, stopped_: Any, seconds: float) -> None:
        waits.append(seconds)

    async def once() -> Pass:
        result = left.pop(0)
        if not left:
            stopped.stop()
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(loop, "sleep_until_woken", record)
    monkeypatch.setattr("dreambooth_operator.handlers.loop.random.random", lambda: spread)
    kind = LoopKind(name="reconcile", retryable=(OSError,), retry_after_error=2.0)
    asyncio.run(asyncio.wait_for(run_loop(state, KEY, kind, once, stopped, LOG), 30))
    assert not left
    return waits


def test_idle_passes_back_off_and_an_active_pass_resets_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    idle, active = Pass(idle=True), Pass()
    waits = run_passes(monkeypatch, [idle, idle, idle, idle, active, idle, active])
    assert waits == [24.0, 48.0, 96.0, 100.0, 12.0, 24.0, 12.0]


def test_a_requested_requeue_still_comes_on_time_while_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    waits = run_passes(monkeypatch, [Pass(idle=True), Pass(idle=True, requeue_after=30.0), Pass(idle=True)])
    assert waits == [24.0, 30.0, 96.0]  # the deadline's requeue; the idle streak goes on


def test_a_failed_pass_retries_soon_and_restarts_the_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    waits = run_passes(monkeypatch, [Pass(idle=True), Pass(idle=True), OSError("refused"), Pass(idle=True)])
    assert waits == [24.0, 48.0, 2.0, 24.0]


def test_the_loop_draws_the_jitter_for_backed_off_intervals_only(monkeypatch: pytest.MonkeyPatch) -> None:
    waits = run_passes(monkeypatch, [Pass(), Pass(idle=True)], spread=0.5)
    assert waits == [12.0, pytest.approx(24.0 * (1 + IDLE_JITTER * 0.5))]

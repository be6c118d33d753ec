"""The one reconcile loop both kinds' daemons run (handlers/loop.py): wake-ups, requeues, errors, the end."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dreambooth_operator.handlers.loop import LoopKind, Pass, run_loop
from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.settings import OperatorSettings

KEY = ("ns", "cat")
LOG = logging.getLogger("test")


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


def make_state(interval: float = 60.0) -> OperatorState:
    poller = ProgressPoller(concurrency=1, timeout_seconds=1, interval_seconds=10, port=1)
    settings = OperatorSettings(reconcile_interval_seconds=interval)
    return OperatorState(settings=settings, api=None, metrics=OperatorMetrics(), poller=poller)


def sample(state: OperatorState, name: str) -> float:
    value = state.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def test_the_loop_ends_when_the_object_is_finished_and_forgets_its_state() -> None:
    state = make_state()
    passes: list[int] = []

    async def once() -> Pass:
        passes.append(1)
        assert KEY in state.wakes
        return Pass(finished=len(passes) == 2, requeue_after=0.0)

    async def scenario() -> None:
        state.written[KEY] = {"phase": "Running"}
        timed = LoopKind(name="reconcile", retryable=(OSError,), timed=True)
        await asyncio.wait_for(run_loop(state, KEY, timed, once, Stopped(), LOG), 30)

    asyncio.run(scenario())
    assert len(passes) == 2  # the requeue (at least MIN_REQUEUE_SECONDS) came well before the 60 s interval
    assert KEY not in state.wakes
    assert KEY not in state.written
    assert sample(state, "dreambooth_operator_reconcile_duration_seconds_count") == 2


def test_errors_are_counted_and_retried_and_a_wake_up_runs_the_next_pass_at_once() -> None:
    state = make_state()
    calls: list[str] = []

    async def scenario() -> None:
        stopped = Stopped()

        async def once() -> Pass:
            calls.append("pass")
            if len(calls) == 1:
                raise OSError("connection refused")  # retryable: retried after retry_after_error
            if len(calls) == 2:
                raise KeyError("a bug")  # any other error: logged with its traceback, the loop goes on
            if len(calls) == 3:
                asyncio.get_running_loop().call_soon(state.wake, KEY)  # an event handler's wake-up
                return Pass()
            stopped.stop()
            return Pass()

        kind = LoopKind(name="reconcile", retryable=(OSError,), retry_after_error=0.05)
        await asyncio.wait_for(run_loop(state, KEY, kind, once, stopped, LOG), 30)

    asyncio.run(scenario())
    assert len(calls) == 4
    assert sample(state, "dreambooth_operator_reconcile_errors_total") == 2
    # Not a timed kind: no duration observed.
    assert sample(state, "dreambooth_operator_reconcile_duration_seconds_count") == 0


def test_a_stopped_daemon_runs_no_pass() -> None:
    state = make_state()
    stopped = Stopped()
    stopped.stop()

    async def once() -> Any:
        raise AssertionError("no pass after the daemon stopped")

    kind = LoopKind(name="InferenceService reconcile", retryable=(OSError,))
    asyncio.run(asyncio.wait_for(run_loop(state, KEY, kind, once, stopped, LOG), 30))
    assert state.wakes == {}

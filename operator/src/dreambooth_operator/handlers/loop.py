"""The one reconcile loop that both kinds' kopf daemons run: one loop per object, so exactly one writer updates
each object and its reconciles never race.

The loop wakes when the object or one of its children changes (the event handlers set its wake-up event), and at
least every `reconcile_interval_seconds` (to poll /progress, and to honour deadlines and TTLs). A failed pass is
counted and logged, and the loop carries on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import kopf

from dreambooth_api.constants import Reason
from dreambooth_operator import kube
from dreambooth_operator.handlers.state import Key, OperatorState

MIN_REQUEUE_SECONDS = 0.2


@dataclass(frozen=True)
class Pass:
    """What one reconcile pass asks of its loop."""

    finished: bool = False
    """Nothing is left to do for the object: the loop ends."""
    requeue_after: float | None = None
    """Reconcile again after this many seconds at the latest (sooner than the interval)."""


@dataclass(frozen=True)
class LoopKind:
    """How one kind's loop handles its passes."""

    name: str
    """For the logs, for example "reconcile" or "InferenceService reconcile"."""
    retryable: tuple[type[BaseException], ...]
    """Errors logged as a warning (the API or a pod was not reachable); any other is logged with its traceback."""
    retry_after_error: float | None = None
    """After a failed pass, reconcile again after at most this many seconds (None: at the interval)."""
    timed: bool = False
    """Observe each pass in the reconcile duration histogram."""


async def run_loop(
    state: OperatorState,
    key: Key,
    kind: LoopKind,
    reconcile_once: Callable[[], Awaitable[Pass]],
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
) -> None:
    """Run `reconcile_once` until it says the object is finished, or the daemon stops (object deleted, operator
    exit); then forget what the state keeps under `key`."""
    wake = state.wakes.setdefault(key, asyncio.Event())
    try:
        while not stopped:
            wake.clear()
            started = time.perf_counter()
            result: Pass | None = None
            try:
                result = await reconcile_once()
            except kind.retryable as err:
                state.metrics.reconcile_errors.inc()
                logger.warning("%s failed, retrying: %s", kind.name, err)
            except Exception:
                state.metrics.reconcile_errors.inc()
                logger.exception("%s failed", kind.name)
            finally:
                if kind.timed:
                    state.metrics.reconcile_duration.observe(time.perf_counter() - started)
            if result is not None and result.finished:
                logger.info("finished; its reconcile loop ends")
                return
            timeout = state.settings.reconcile_interval_seconds
            if result is not None and result.requeue_after is not None:
                timeout = min(timeout, max(MIN_REQUEUE_SECONDS, result.requeue_after))
            if result is None and kind.retry_after_error is not None:
                timeout = min(timeout, kind.retry_after_error)
            await sleep_until_woken(wake, stopped, timeout)
    finally:
        state.forget(key)


def report_field_conflict(state: OperatorState, key: Key, body: kopf.Body, err: kube.FieldConflictError) -> None:
    """A Warning event (reason ChildConflict) when another field manager changed a field of one of the object's
    children, which the operator does not overwrite: once per message, not at every retry of the pass."""
    message = str(err)
    if state.conflicts.get(key) != message:
        state.conflicts[key] = message
        kopf.event(body, type="Warning", reason=Reason.CHILD_CONFLICT, message=message[:1024])


async def sleep_until_woken(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> None:
    """Until a wake-up, the daemon's stop (operator exit, object deletion), or the timeout."""

    async def until_stopped() -> None:
        await stopped.wait()

    waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(until_stopped())}
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()

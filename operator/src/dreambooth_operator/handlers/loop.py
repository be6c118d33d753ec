"""The one reconcile loop that both kinds' kopf daemons run: one loop per object, so exactly one writer updates
each object and its reconciles never race.

The loop wakes when the object or one of its children changes (the event handlers set its wake-up event), when a
pass asked for it (`Pass.requeue_after`: a deadline, a TTL, a budget running out), and at least every
`reconcile_interval_seconds` (to poll /progress). A pass that says nothing can change by itself (`Pass.idle`: a job
whose pods wait for a node, or that has none running, or is terminal) lengthens that periodic check
(`idle_interval`: doubled per idle pass up to `idle_reconcile_max_seconds`), so that 1,000 waiting jobs cost next
to nothing while every event still wakes its loop at once. A failed pass is counted and logged, and the loop
carries on.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from dreambooth_api.constants import Reason
from dreambooth_operator import kube, podstate
from dreambooth_operator.handlers.state import Key, OperatorState

MIN_REQUEUE_SECONDS = 0.2
IDLE_GROWTH = 2.0
"""Each idle pass in a row multiplies the periodic interval by this (up to `idle_reconcile_max_seconds`)."""
IDLE_JITTER = 0.1
"""A backed-off interval is lengthened by up to this fraction, so that jobs created together do not wake together."""


@dataclass(frozen=True)
class Pass:
    """What one reconcile pass asks of its loop."""

    finished: bool = False
    """Nothing is left to do for the object: the loop ends."""
    requeue_after: float | None = None
    """Reconcile again after this many seconds at the latest (sooner than the interval)."""
    idle: bool = False
    """Nothing can change for the object by itself until an event (it or a child changed) or `requeue_after`:
    the periodic check backs off (`idle_interval`)."""


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
    idle_passes = 0
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
            idle_passes = idle_passes + 1 if result is not None and result.idle else 0
            settings = state.settings
            spread = random.random()  # noqa: S311 - jitter, not a secret
            timeout = idle_interval(
                settings.reconcile_interval_seconds, idle_passes, settings.idle_reconcile_max_seconds, spread
            )
            if result is not None and result.requeue_after is not None:
                timeout = min(timeout, max(MIN_REQUEUE_SECONDS, result.requeue_after))
            if result is None and kind.retry_after_error is not None:
                timeout = min(timeout, kind.retry_after_error)
            await sleep_until_woken(wake, stopped, timeout)
    finally:
        state.forget(key)


def idle_interval(base: float, idle_passes: int, ceiling: float, spread: float = 0.0) -> float:
    """The periodic check's interval after `idle_passes` idle passes in a row: `base` while the object may change
    by itself (0 idle passes), then `base` * IDLE_GROWTH ** idle_passes up to `ceiling` (never below `base`),
    lengthened by `spread` (in [0, 1): the caller's random draw) times IDLE_JITTER."""
    if idle_passes <= 0:
        return base
    ceiling = max(base, ceiling)
    grown = base * IDLE_GROWTH ** min(idle_passes, 64)  # bounded exponent: no overflow after a long idle time
    return min(grown, ceiling) * (1.0 + IDLE_JITTER * min(max(spread, 0.0), 1.0))


def pods_wait(pods: Iterable[Mapping[str, Any]]) -> bool:
    """None of the pods can change by itself: each has finished, or is Pending without a node (the scheduler's
    binding is a watch event). A pod on a node (pulling, running: its /progress is polled), one whose phase is
    unknown, or one being deleted may change without an event of ours, so the job is not idle."""
    for pod in pods:
        if podstate.is_terminal(pod) and not podstate.is_deleting(pod):
            continue
        pending = podstate.pod_phase(pod) == "Pending" and not podstate.is_deleting(pod)
        if not pending or podstate.has_condition(pod, "PodScheduled"):
            return False
    return True


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

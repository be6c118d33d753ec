"""What the kopf handlers of both kinds share: the operator's state (kept in kopf's memo) and the loops' keys."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client

from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.observed import ProgressSample
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.settings import OperatorSettings

EXPECT_CREATED_SECONDS = 30.0
"""How long a loop waits for the index to show a batch Job it created (`OperatorState.expect`) before it plans
without it (a watch that lost the event; the create of an existing Job is a no-op then)."""

Key = tuple[str, str]
"""A loop's wake-up key: (namespace, name) of a DreamBoothJob; InferenceServices use `inference_key`."""
INFERENCE_PREFIX = "inferenceservice/"


@dataclass
class OperatorState:
    """What the handlers share; created by the startup handler and kept in kopf's memo."""

    settings: OperatorSettings
    api: client.ApiClient
    metrics: OperatorMetrics
    poller: ProgressPoller
    wakes: dict[Key, asyncio.Event] = field(default_factory=dict)
    samples: dict[Key, ProgressSample] = field(default_factory=dict)
    polls: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    """The /progress request in flight per job (at most one)."""
    written: dict[Key, Any] = field(default_factory=dict)
    """Per job, the status (without kopf's part) that the API returned for the operator's last status write."""
    gone_pods: dict[Key, dict[str, Any]] = field(default_factory=dict)
    """Per job, the last state of each pod deleted since its last reconcile (by uid), for the usage ledger."""
    conflicts: dict[Key, str] = field(default_factory=dict)
    """Per loop, the last field conflict reported in an event (kube.FieldConflictError), so that it is reported once."""
    loop_locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    """Per DreamBoothJob, held by the loop that reconciles it (its own loop, or the one that serves an evaluation
    request once its own loop has ended), so that one writer at a time updates it."""

    def loop_lock(self, key: Key) -> asyncio.Lock:
        return self.loop_locks.setdefault(key, asyncio.Lock())

    expected: dict[Key, tuple[frozenset[str], float]] = field(default_factory=dict)
    """Per job, the batch Jobs its loop created that the index has not shown yet, and until when (monotonic) to
    wait for them (`expect`, `awaiting`)."""

    def expect(self, key: Key, names: list[str], seconds: float = EXPECT_CREATED_SECONDS) -> None:
        """The loop of `key` just created the batch Jobs `names`: until the index shows them, a plan made from it
        would create them again (its own write wakes the loop first: the status written before the create)."""
        if names:
            self.expected[key] = (frozenset(names), time.monotonic() + seconds)

    def awaiting(self, key: Key, indexed: Iterable[Mapping[str, Any]]) -> float | None:
        """Seconds left to wait for the batch Jobs the loop created to appear in `indexed` (the index's batch Jobs
        of the job); None when it may plan (they are there, none were created, or the wait is over). Their watch
        event wakes the loop. (The expectations of Kubernetes' own controllers, such as the ReplicaSet's.)"""
        names, until = self.expected.get(key, (frozenset(), 0.0))
        left = until - time.monotonic()
        if not names or left <= 0 or names <= {str((j.get("metadata") or {}).get("name")) for j in indexed}:
            self.expected.pop(key, None)
            return None
        return left

    def wake(self, key: Key) -> None:
        event = self.wakes.get(key)
        if event is not None:
            event.set()

    def forget(self, key: Key) -> None:
        """Drop everything kept for a loop that ended (its object is finished or gone, or the operator stops)."""
        self.wakes.pop(key, None)
        self.samples.pop(key, None)
        self.written.pop(key, None)
        self.gone_pods.pop(key, None)
        self.conflicts.pop(key, None)
        self.expected.pop(key, None)
        poll = self.polls.pop(key, None)
        if poll is not None:
            poll.cancel()
        self.poller.forget(key)


def state_of(memo: Any) -> OperatorState:
    state = memo.get("state") if isinstance(memo, Mapping) else getattr(memo, "state", None)
    if not isinstance(state, OperatorState):
        raise kopf.TemporaryError("operator state is not initialised yet", delay=1)
    return state


def inference_key(namespace: str | None, name: str | None) -> Key:
    """The wake-up key of an InferenceService's loop (apart from the DreamBoothJobs' keys)."""
    return (namespace or "", INFERENCE_PREFIX + (name or ""))


def trim(body: Mapping[str, Any], spec_keys: Iterable[str] = ()) -> dict[str, Any]:
    """The parts of a child that the reconcile reads (kopf indexes keep this copy, not the whole object)."""
    meta = body.get("metadata") or {}
    trimmed: dict[str, Any] = {
        "metadata": {
            k: copy.deepcopy(meta[k])
            for k in (
                "name",
                "namespace",
                "uid",
                "labels",
                "annotations",
                "ownerReferences",
                "deletionTimestamp",
                "creationTimestamp",
            )
            if k in meta
        },
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }
    spec = body.get("spec") or {}
    trimmed["spec"] = {k: copy.deepcopy(spec[k]) for k in spec_keys if k in spec}
    return trimmed

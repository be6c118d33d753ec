"""The DreamBoothJob handler's creates, against a recording fake of kube.py: the shared children are created
before the status write and their creates are their observation (no read of an absent child), a foreign one
stops every further create, and a pass made before the index shows the batch Job the loop just created plans
nothing (it would create it again)."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from typing import Any

import kopf
import pytest

from dreambooth_operator import kube, ownership
from dreambooth_operator.handlers import jobs
from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.plan import ActionKind
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import make_job

KEY = ("team-a", "cat")


class FakeKube:
    """Records every call; `foreign` names the children that another object holds."""

    def __init__(self, job: dict[str, Any], foreign: frozenset[str] = frozenset()) -> None:
        self.job = copy.deepcopy(job)
        self.foreign = foreign
        self.calls: list[tuple[str, str]] = []

    def ensure_child(self, _api: Any, manifest: Mapping[str, Any], owner: Mapping[str, Any], **_: Any) -> Any:
        name = manifest["metadata"]["name"]
        self.calls.append(("ensure_child", name))
        if name in self.foreign:
            found = {"kind": manifest["kind"], "metadata": {"name": name, "uid": f"theirs-{name}"}}
            conflict = ownership.foreign(manifest["kind"], found, owner)
            assert conflict is not None
            raise kube.ForeignChildError(conflict, found)
        ref = {"kind": "DreamBoothJob", "name": "cat", "uid": owner["metadata"]["uid"], "controller": True}
        return {**manifest, "metadata": {**manifest["metadata"], "uid": f"uid-{name}", "ownerReferences": [ref]}}

    def get(self, _api: Any, _v: str, kind: str, _ns: str, name: str) -> Any:
        self.calls.append(("get", name))
        return None

    def create(self, _api: Any, manifest: Mapping[str, Any]) -> bool:
        self.calls.append(("create", manifest["metadata"]["name"]))
        return True

    def patch_status(self, _api: Any, _ns: str, _name: str, patch: Mapping[str, Any], **_: Any) -> Any:
        self.calls.append(("patch_status", ""))
        self.job["status"] = {**(self.job.get("status") or {}), **patch}
        return copy.deepcopy(self.job)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeKube:
    api = FakeKube({})
    for name in ("ensure_child", "get", "create", "patch_status"):
        monkeypatch.setattr(kube, name, getattr(api, name))
    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)
    return api


def state() -> OperatorState:
    poller = ProgressPoller(concurrency=1, timeout_seconds=1, interval_seconds=10, port=1)
    return OperatorState(settings=OperatorSettings(), api=None, metrics=OperatorMetrics(), poller=poller)


def reconcile_once(st: OperatorState, body: dict[str, Any], batch_jobs: list[Any]) -> Any:
    return asyncio.run(jobs.reconcile_job(st, kopf.Body(body), {KEY: batch_jobs}, {KEY: []}, logging.getLogger("t")))


def test_a_new_job_creates_its_children_without_reading_them_and_not_twice(fake: FakeKube) -> None:
    job = make_job().obj()
    st = state()
    plan = reconcile_once(st, job, [])
    assert [a.kind for a in plan.actions] == [ActionKind.CREATE_PREFLIGHT]
    # The shared children first (their creates tell whether anything else holds the names), then the status,
    # then the input check's batch Job; nothing is read.
    assert fake.calls == [
        ("ensure_child", "cat-config"),
        ("ensure_child", "cat-workers"),
        ("ensure_child", "cat-network"),
        ("patch_status", ""),
        ("create", "cat-check"),
    ]
    # Woken by its own status write before the index shows the check's Job: no plan, no call, a short requeue.
    fake.calls.clear()
    waiting = reconcile_once(st, {**job, "status": fake.job["status"]}, [])
    assert (waiting.actions, fake.calls) == ([], [])
    assert waiting.requeue_after is not None
    assert 0 < waiting.requeue_after <= 30
    # Once the index shows it, the job is planned again (and nothing is created again).
    check = {"metadata": {"name": "cat-check", "uid": "uid-check", "labels": {}}, "status": {}}
    reconcile_once(st, {**job, "status": fake.job["status"]}, [check])
    assert not [c for c in fake.calls if c[0] in ("ensure_child", "create")]
    assert KEY not in st.expected


def test_a_foreign_child_stops_every_further_create_and_blocks_the_job(fake: FakeKube) -> None:
    fake.foreign = frozenset({"cat-workers"})
    plan = reconcile_once(state(), make_job().obj(), [])
    assert plan.actions == []
    # The NetworkPolicy after the foreign Service is only read, so that the conflict names every one of them.
    assert fake.calls == [
        ("ensure_child", "cat-config"),
        ("ensure_child", "cat-workers"),
        ("get", "cat-network"),
        ("patch_status", ""),
    ]
    conditions = {c.type: c for c in plan.status.conditions}
    assert conditions["ChildConflict"].status == "True"
    assert "the Service cat-workers already exists" in (conditions["ChildConflict"].message or "")


def test_the_wait_for_a_created_batch_job_ends_when_it_is_seen_or_times_out() -> None:
    st = state()
    assert st.awaiting(KEY, []) is None  # nothing created
    st.expect(KEY, ["cat-a0"], seconds=5)
    left = st.awaiting(KEY, [{"metadata": {"name": "cat-check"}}])
    assert left is not None
    assert 0 < left <= 5
    assert st.awaiting(KEY, [{"metadata": {"name": "cat-a0"}}]) is None
    assert st.awaiting(KEY, []) is None  # seen once: no longer awaited
    st.expect(KEY, ["cat-a1"], seconds=0)
    assert st.awaiting(KEY, []) is None  # the wait is over: plan without it (a create of it is a no-op)
    st.expect(KEY, [])
    assert KEY not in st.expected

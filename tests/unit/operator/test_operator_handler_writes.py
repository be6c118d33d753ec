"""The DreamBoothJob handler's writes, in order, against a recording fake of kube.py: the status before any action
(a crash between them must not lose a restart count), the counted-preemptions annotation before the events, and a
copy of the job from between the two writes is never planned from (it would count a preemption twice)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Mapping
from typing import Any

import kopf
import pytest

from dreambooth_api.constants import ANNOTATION_COUNTED_PREEMPTIONS
from dreambooth_operator import kube
from dreambooth_operator.handlers import jobs
from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod


class FakeApi:
    """Records every write; holds the DreamBoothJob as the API server would."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = copy.deepcopy(job)
        self.calls: list[tuple[str, str]] = []

    def patch_status(self, _api: Any, _ns: str, _name: str, patch: Mapping[str, Any], **_: Any) -> Any:
        self.calls.append(("patch_status", ""))
        self.job["status"] = {**(self.job.get("status") or {}), **patch}
        return copy.deepcopy(self.job)

    def merge_patch(self, _api: Any, _v: str, kind: str, _ns: str, name: str, patch: Mapping[str, Any]) -> Any:
        self.calls.append(("merge_patch", f"{kind}/{name}"))
        if kind == "DreamBoothJob":
            annotations = self.job["metadata"].setdefault("annotations", {})
            annotations.update(patch["metadata"]["annotations"])
        return copy.deepcopy(self.job)

    def delete(self, _api: Any, _v: str, kind: str, _ns: str, name: str, *_: Any, **__: Any) -> bool:
        self.calls.append(("delete", f"{kind}/{name}"))
        return True

    def get(self, _api: Any, _v: str, kind: str, _ns: str, name: str) -> Any:
        self.calls.append(("get", f"{kind}/{name}"))
        return copy.deepcopy(self.job) if kind == "DreamBoothJob" else None


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    api = FakeApi({})
    for name in ("patch_status", "merge_patch", "delete", "get"):
        monkeypatch.setattr(kube, name, getattr(api, name))

    def event(_body: Any, *, type: str, reason: str, message: str) -> None:
        api.calls.append(("event", reason))

    monkeypatch.setattr(kopf, "event", event)
    return api


def state() -> OperatorState:
    poller = ProgressPoller(concurrency=1, timeout_seconds=1, interval_seconds=10, port=1)
    return OperatorState(settings=OperatorSettings(), api=None, metrics=OperatorMetrics(), poller=poller)


def reconcile_once(st: OperatorState, body: dict[str, Any], batch_jobs: list[Any], pods: list[Any]) -> Any:
    key = ("team-a", "cat")
    return asyncio.run(
        jobs.reconcile_job(st, kopf.Body(body), {key: batch_jobs}, {key: pods}, logging.getLogger("test"))
    )


def test_a_gang_restart_is_written_before_the_failed_attempt_is_deleted(fake: FakeApi) -> None:
    job = make_job().nodes(2).status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    fake.job = copy.deepcopy(job)
    failed = make_pod(job, 0, 1).exited(1, "nccl timeout").obj()
    plan = reconcile_once(state(), job, [make_batch_job(job).obj()], [make_pod(job, 0, 0).running().obj(), failed])
    assert plan.status.restarts.failures == 1
    writes = [c for c in fake.calls if c[0] != "get"]
    assert writes[0] == ("patch_status", "")
    assert ("event", "Retrying") in writes
    assert writes[-1] == ("delete", "Job/cat-a0")
    assert fake.job["status"]["attempt"] == 1


def test_a_copy_from_between_the_status_and_the_annotation_write_is_read_again(fake: FakeApi) -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    fake.job = copy.deepcopy(job)
    st = state()
    batch = make_batch_job(job).obj()
    preempted = make_pod(job).running().disrupted().obj()
    first = reconcile_once(st, job, [batch], [preempted])
    assert first.status.restarts.preemptions == 1
    assert [c[0] for c in fake.calls if c[0] in ("patch_status", "merge_patch")] == ["patch_status", "merge_patch"]
    counted = json.loads(fake.job["metadata"]["annotations"][ANNOTATION_COUNTED_PREEMPTIONS])
    assert counted == [preempted["metadata"]["uid"]]
    # The watch delivers the version between the two writes: the new status, the old annotations.
    between = {**job, "status": fake.job["status"]}
    fake.calls.clear()
    second = reconcile_once(st, between, [batch], [preempted])
    assert ("get", "DreamBoothJob/cat") in fake.calls  # read again instead of planned from
    assert second.status.restarts.preemptions == 1  # not counted twice

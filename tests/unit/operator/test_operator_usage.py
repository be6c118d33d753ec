"""GPU-time accounting: each pod counted once, from its binding to its stop, over attempts and operator restarts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from dreambooth_api.job import DreamBoothJobStatus, Usage
from dreambooth_operator.handlers.jobs import record_metrics
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.observed import Observed
from dreambooth_operator.reconcile import reconcile
from dreambooth_operator.usage import KEEP_GONE, REFRESH_SECONDS, account, bound_at, stopped_at
from tests.infra.wrappers import T0, make_batch_job, make_job, make_pod


def at(seconds: float) -> Any:
    return T0 + timedelta(seconds=seconds)


JOB = make_job().obj()


def running(uid: str, bound: float, attempt: int = 0) -> dict[str, Any]:
    return make_pod(JOB, attempt=attempt, uid=uid).scheduled(at(bound)).running(started=at(bound + 5)).obj()


def stopped(uid: str, bound: float, finished: float, code: int = 0, attempt: int = 0) -> dict[str, Any]:
    return make_pod(JOB, attempt=attempt, uid=uid).scheduled(at(bound)).exited(code, finished=at(finished)).obj()


def test_a_running_pod_counts_from_its_binding_and_grows_with_time() -> None:
    first = account(None, [running("p", 10)], gpus_per_pod=4, now=at(70))
    assert (first.pod_seconds, first.gpu_seconds, first.gpus_per_pod) == (60, 240, 4)
    again = account(first, [running("p", 10)], gpus_per_pod=4, now=at(100))
    assert (again.pod_seconds, again.gpu_seconds) == (90, 360)
    assert [(r.uid, r.final) for r in again.pods] == [("p", False)]


def test_a_running_pods_time_advances_in_steps_so_that_the_operators_own_writes_do_not_loop() -> None:
    first = account(None, [running("p", 0)], gpus_per_pod=1, now=at(60))
    soon = account(first, [running("p", 0)], gpus_per_pod=1, now=at(60 + REFRESH_SECONDS - 1))
    assert soon == first  # nothing to write
    assert account(first, [running("p", 0)], gpus_per_pod=1, now=at(60 + REFRESH_SECONDS)).pod_seconds == 75
    # A stop is recorded at once, whenever it comes.
    assert account(first, [stopped("p", 0, 62)], gpus_per_pod=1, now=at(63)).pod_seconds == 62


def test_a_stopped_pod_counts_until_its_containers_finished_and_never_again() -> None:
    live = account(None, [running("p", 0)], gpus_per_pod=1, now=at(50))
    done = account(live, [stopped("p", 0, 42)], gpus_per_pod=1, now=at(60))
    assert done.pod_seconds == 42  # finishedAt, not the time the operator noticed
    assert done.pods[0].final
    later = account(done, [stopped("p", 0, 42)], gpus_per_pod=1, now=at(600))
    assert later == done


def test_an_unscheduled_pod_costs_nothing() -> None:
    pending = make_pod(JOB, uid="p").unschedulable().obj()
    assert bound_at(pending) is None
    assert account(None, [pending], gpus_per_pod=8, now=at(300)) == Usage(gpus_per_pod=8)


def test_a_pod_that_vanished_unseen_counts_until_it_was_last_seen_and_its_replacement_adds_its_own() -> None:
    # Attempt 0's pod is deleted with its batch Job between two reconciles; attempt 1's pod runs 30 s later.
    seen = account(None, [running("a0", 0)], gpus_per_pod=2, now=at(100))
    after = account(seen, [running("a1", 130, attempt=1)], gpus_per_pod=2, now=at(160))
    assert after.pod_seconds == 100 + 30
    assert after.gpu_seconds == 260
    assert {r.uid for r in after.pods} == {"a0", "a1"}
    # An operator restart re-lists the same pods from the same status: nothing is counted twice.
    assert account(after, [running("a1", 130, attempt=1)], gpus_per_pod=2, now=at(160)) == after


def test_a_deleted_pods_last_state_closes_its_entry_at_its_stop() -> None:
    # Seen once at 60 s; then it ran to 70 s, stopped, and was deleted before the next reconcile at 72 s: its
    # watch DELETED event's state closes the entry at the true stop, though the index no longer lists it.
    seen = account(None, [running("a0", 0)], gpus_per_pod=1, now=at(60))
    closed = account(seen, [], gpus_per_pod=1, now=at(72), gone=[stopped("a0", 0, 70, code=12)])
    assert closed.pod_seconds == 70
    assert closed.pods[0].final
    # Force-deleted while running (a lost node): at the latest its deletion time, and never after `now`.
    forced = make_pod(JOB, uid="a0").scheduled(at(0)).running().deleting(at(66)).obj()
    assert account(seen, [], gpus_per_pod=1, now=at(72), gone=[forced]).pod_seconds == 66
    # A pod never counted while it lived is not added from its deletion; one still listed is not closed.
    assert account(seen, [], gpus_per_pod=1, now=at(72), gone=[stopped("other", 0, 70)]) == seen
    still = account(seen, [running("a0", 0)], gpus_per_pod=1, now=at(72), gone=[stopped("a0", 0, 70)])
    assert not still.pods[0].final


def test_stop_time_falls_back_to_the_conditions_when_no_container_ran() -> None:
    evicted = make_pod(JOB, uid="p").scheduled(at(0)).obj()
    evicted["status"]["phase"] = "Failed"
    evicted["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "lastTransitionTime": "2026-11-27T00:00:07Z"}
    )
    assert stopped_at(evicted) == at(7)
    assert account(None, [evicted], gpus_per_pod=1, now=at(50)).pod_seconds == 7
    assert stopped_at(running("r", 0)) is None


def test_the_ledger_is_bounded_and_keeps_the_total() -> None:
    usage: Usage | None = None
    for i in range(40):
        usage = account(usage, [stopped(f"p{i:02d}", 100 * i, 100 * i + 10 + i)], gpus_per_pod=1, now=at(100 * i + 60))
    assert usage is not None
    assert len(usage.pods) == KEEP_GONE + 1  # the gone ones kept, and the one observed last
    assert usage.pod_seconds == sum(10 + i for i in range(40))
    assert usage.earlier_pod_seconds == sum(10 + i for i in range(40 - KEEP_GONE - 1))
    assert [r.uid for r in usage.pods][-1] == "p39"


def _reconcile(job: dict[str, Any], pods: list[dict[str, Any]], now: float, batch: dict[str, Any]) -> Any:
    return reconcile(Observed(job=job, batch_jobs=[batch], pods=pods, now=at(now)))


def test_reconcile_keeps_the_usage_in_the_status_and_reports_it_when_the_job_ends() -> None:
    job = make_job().gpus(4).obj()
    batch = make_batch_job(job).obj()
    pod = make_pod(job).scheduled(at(0)).running(started=at(3))
    first = _reconcile(job, [pod.obj()], 40, batch)
    assert first.status.usage is not None
    assert (first.status.usage.pod_seconds, first.status.usage.gpu_seconds) == (40, 160)
    # Written and read back (the wire format), then the pod finishes and the batch Job completes.
    job = {**job, "status": first.status_wire()}
    assert DreamBoothJobStatus.model_validate(job["status"]).usage == first.status.usage
    done_pod = make_pod(job).scheduled(at(0)).exited(0, {"steps": 20}, finished=at(55)).obj()
    done = _reconcile(job, [done_pod], 70, make_batch_job(job).complete().obj())
    assert done.status.phase == "Succeeded"
    assert done.status.usage is not None
    assert done.status.usage.gpu_seconds == 55 * 4
    metrics = OperatorMetrics()
    record_metrics(metrics, job, first.status.phase, done)
    assert metrics.registry.get_sample_value("dreambooth_operator_job_gpu_seconds_sum", {"phase": "Succeeded"}) == 220
    # Terminal: later reconciles change nothing.
    final = _reconcile({**job, "status": done.status_wire()}, [done_pod], 900, make_batch_job(job).complete().obj())
    assert final.status.usage == done.status.usage


def test_a_job_without_pods_has_no_usage() -> None:
    plan = reconcile(Observed(job=make_job().obj(), batch_jobs=[], pods=[], now=at(5)))
    assert plan.status.usage is None

"""GPU budget policy (runPolicy.gpuSecondsLimit): the attempt stops and the job fails once its pods used the limit."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from dreambooth_operator.observed import Observed
from dreambooth_operator.plan import Action, ActionKind, Plan
from dreambooth_operator.policies.budget import account_usage, remaining_gpu_seconds, seconds_until_spent
from dreambooth_operator.reconcile import reconcile
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import builder


def at(seconds: float) -> Any:
    return T0 + timedelta(seconds=seconds)


def test_budget_arithmetic() -> None:
    assert remaining_gpu_seconds(None, 500.0) is None
    assert remaining_gpu_seconds(600, 500.0) == 100
    assert remaining_gpu_seconds(600, 600.0) == 0
    assert seconds_until_spent(100, 4) == 25
    assert seconds_until_spent(100, 0) is None


def _job(limit: int | None, gpus: int = 4) -> dict[str, Any]:
    job = make_job().gpus(gpus).status(attempt=0, phase="Running", startTime=iso(T0))
    if limit is not None:
        job = job.run_policy(gpuSecondsLimit=limit)
    return job.obj()


def _run(job: dict[str, Any], now: float, pods: list[dict[str, Any]] | None = None) -> Plan:
    pods = pods if pods is not None else [make_pod(job).scheduled(at(0)).running(started=at(2)).obj()]
    return reconcile(Observed(job=job, batch_jobs=[make_batch_job(job).obj()], pods=pods, now=at(now)))


def test_under_the_limit_the_job_runs_and_is_reconciled_when_the_limit_will_be_reached() -> None:
    plan = _run(_job(limit=400), now=60)  # 60 s x 4 GPUs = 240 used: 160 left, spent in 40 s
    assert plan.status.phase == "Initializing"  # (no /progress sample in this test)
    assert plan.actions == []
    assert plan.requeue_after == 40
    # Without a limit, no such wake-up.
    assert _run(_job(limit=None), now=60).requeue_after != 40


def test_at_the_limit_the_attempt_stops_and_the_job_fails_naming_both_figures() -> None:
    job = _job(limit=400)
    job["status"]["lastCheckpoint"] = {"step": 40, "uri": "s3://b/o/checkpoints/step-00000040"}
    plan = _run(job, now=101)
    assert plan.status.phase == "Failed"
    failed = next(c for c in plan.status.conditions if c.type == "Failed")
    assert failed.reason == "GpuSecondsLimitExceeded"
    assert "404 GPU-seconds" in failed.message
    assert "runPolicy.gpuSecondsLimit (400)" in failed.message
    assert "step 40" in failed.message
    assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]
    assert plan.status.usage is not None
    assert plan.status.usage.gpu_seconds == 404  # counted up to now, not to the last 15 s step
    assert ("Warning", "GpuSecondsLimitExceeded") in [(e.type, e.reason) for e in plan.events]


def test_the_limit_counts_every_attempt_and_a_stopped_pod_holds_no_gpu() -> None:
    # Attempt 0's pod held 4 GPUs for 90 s (360) and stopped; the job is between attempts: under the limit, and
    # nothing is burning, so no wake-up for the budget.
    job = _job(limit=400)
    stopped = make_pod(job).scheduled(at(0)).exited(12, finished=at(90)).obj()
    plan = _run(job, now=120, pods=[stopped])
    assert plan.status.usage is not None
    assert plan.status.usage.gpu_seconds == 360
    assert plan.status.phase != "Failed"
    # The next attempt's pod brings it over the limit after 10 s more.
    again = make_pod(job, attempt=0, uid="second").scheduled(at(130)).running(started=at(131)).obj()
    assert _run(job, now=141, pods=[stopped, again]).status.phase == "Failed"


def test_usage_is_accounted_in_every_phase_once_a_pod_was_seen() -> None:
    job = _job(limit=None)
    b = builder(job)
    account_usage(b)
    assert b.status.usage is None  # no pod yet, nothing to record
    done = make_job().gpus(2).status(phase="Succeeded", startTime=iso(T0), completionTime=iso(at(60))).obj()
    pod = make_pod(done).scheduled(at(0)).exited(0, finished=at(60)).obj()
    b = builder(done, now=at(120), pods=[pod])
    account_usage(b)
    assert b.status.usage is not None
    assert b.status.usage.gpu_seconds == 120

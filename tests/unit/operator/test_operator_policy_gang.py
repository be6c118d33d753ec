"""Gang restart policy: any failed rank of a multi-node attempt restarts the whole gang."""

from __future__ import annotations

from dreambooth_operator.builders import parse_spec
from dreambooth_operator.plan import Action, ActionKind
from dreambooth_operator.policies import gang
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import after, attempt_of, builder, cond, run


def test_multi_node_gang_restart_waits_for_old_pods_then_creates_the_next_attempt() -> None:
    job = make_job().nodes(2).status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    rank0 = make_pod(job, 0, 0).running().obj()
    rank1 = make_pod(job, 0, 1).running().disrupted().deleting().obj()
    plan = run(job, [make_batch_job(job, 0).obj()], [rank0, rank1])
    assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]
    assert plan.status.attempt == 1
    assert plan.status.restarts.preemptions == 1
    assert plan.status.restarts.failures == 0
    assert cond(plan, "Running") == ("False", "Preempted")
    job = after(job, plan)
    # The old attempt is still stopping (its pods write a checkpoint): wait.
    waiting = run(job, [make_batch_job(job, 0).deleting().obj()], [rank0])
    assert waiting.actions == []
    assert waiting.status.attempt == 1
    assert waiting.status.restarts.preemptions == 1
    # Old pods gone: create attempt 1.
    plan = run(job, [], [])
    assert plan.actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=1)]


def test_multi_node_failures_count_against_backoff_limit() -> None:
    job = make_job().nodes(2).run_policy(backoffLimit=1)
    job = job.status(attempt=1, phase="Running", startTime=iso(T0), restarts={"failures": 1, "total": 1}).obj()
    plan = run(job, [make_batch_job(job, 1).obj()], [make_pod(job, 1, 0).exited(11, "nccl timeout").obj()])
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "BackoffLimitExceeded")
    assert "nccl timeout" in (plan.status.message or "")
    assert Action(ActionKind.DELETE_BATCH_JOB, name="cat-a1") in plan.actions


def test_a_preempted_rank_and_its_peer_crashing_on_the_broken_collective_count_as_one_preemption() -> None:
    job = make_job().nodes(2).run_policy(backoffLimit=0).status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    peer = make_pod(job, 0, 0).exited(11, "gloo: connection reset by peer").obj()
    reclaimed = make_pod(job, 0, 1).running().disrupted().deleting().obj()
    plan = run(job, [make_batch_job(job, 0).obj()], [peer, reclaimed])
    assert plan.status.phase == "Pending"
    assert plan.status.attempt == 1
    assert (plan.status.restarts.preemptions, plan.status.restarts.failures) == (1, 0)
    assert cond(plan, "Running") == ("False", "Preempted")
    assert "rank 1 (pod cat-a0-1-abcde) was preempted" in (plan.status.message or "")
    assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]


def test_a_single_node_job_or_a_suspended_gang_is_not_restarted() -> None:
    single = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    b = builder(single, batch_jobs=[make_batch_job(single).obj()], pods=[make_pod(single).exited(11).obj()])
    assert gang.restart(b, parse_spec(single), attempt_of(b)) is None
    suspended = make_job().nodes(2).suspend().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pods = [make_pod(suspended, 0, 0).exited(12).obj()]
    b = builder(suspended, batch_jobs=[make_batch_job(suspended).obj()], pods=pods)
    assert gang.restart(b, parse_spec(suspended), attempt_of(b)) is None
    assert (b.actions, b.status.attempt) == ([], 0)

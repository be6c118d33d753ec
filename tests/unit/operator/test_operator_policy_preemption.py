"""Single-node preemption policy: each preempted pod is counted once, by uid, across operator restarts."""

from __future__ import annotations

from dreambooth_operator.policies import preemption
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import after, cond, reasons, run


def test_single_node_preemption_is_counted_once() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    evicted = make_pod(job, uid="p1").running().disrupted().deleting().obj()
    plan = run(job, [make_batch_job(job).obj()], [evicted])
    assert plan.status.restarts.preemptions == 1
    assert plan.counted_pods == ["p1"]
    assert cond(plan, "Running") == ("False", "Preempted")
    assert ("Warning", "Preempted") in reasons(plan)
    replacement = make_pod(job, uid="p2").running().obj()
    again = run(after(job, plan), [make_batch_job(job).obj()], [evicted, replacement])
    assert again.status.restarts.preemptions == 1
    assert again.counted_pods is None
    assert again.status.phase == "Initializing"
    assert cond(again, "Running") == ("True", "Resumed")


def test_pods_stopped_by_a_suspend_are_not_preemptions() -> None:
    job = make_job().suspend().status(attempt=0, phase="Suspended", startTime=iso(T0)).obj()
    stopped = make_pod(job, uid="p1").exited(12, {"status": "preempted"}).obj()
    plan = run(job, [make_batch_job(job).suspended().obj()], [stopped])
    assert plan.status.restarts.preemptions == 0
    assert plan.counted_pods == ["p1"]
    resumed = after(job, plan)
    resumed["spec"]["runPolicy"]["suspend"] = False
    again = run(resumed, [make_batch_job(job).suspended().obj()], [stopped])
    assert again.status.restarts.preemptions == 0


def test_the_counted_pods_annotation_is_read_leniently() -> None:
    key = "dreambooth.dev/counted-preemptions"
    assert preemption.counted_pods({}) == []
    assert preemption.counted_pods({key: '["a", 2]'}) == ["a", "2"]
    assert preemption.counted_pods({key: "not json"}) == []
    assert preemption.counted_pods({key: "7"}) == []


def test_an_operator_restart_does_not_count_a_pod_again_and_the_list_is_bounded() -> None:
    earlier = [f"old-{i}" for i in range(preemption.COUNTED_PODS_KEEP)]
    job = make_job().counted(*earlier, "p1").status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    evicted = make_pod(job, uid="p1").running().disrupted().deleting().obj()
    assert run(job, [make_batch_job(job).obj()], [evicted]).counted_pods is None
    new = make_pod(job, uid="p2").exited(12).obj()
    plan = run(job, [make_batch_job(job).obj()], [evicted, new])
    assert plan.counted_pods is not None
    assert len(plan.counted_pods) == preemption.COUNTED_PODS_KEEP
    assert plan.counted_pods[-1] == "p2"

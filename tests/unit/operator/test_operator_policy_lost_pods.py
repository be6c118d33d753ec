"""Lost-node policy: pods stuck deleting past their grace period are force-deleted."""

from __future__ import annotations

from datetime import timedelta

from dreambooth_operator.plan import Action, ActionKind
from dreambooth_operator.policies import lost_pods
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import cond, reasons, run


def test_older_attempt_pods_stuck_deleting_on_a_lost_node_are_force_deleted() -> None:
    job = make_job().nodes(2).status(attempt=1, phase="Pending", startTime=iso(T0)).obj()
    old_job = make_batch_job(job, 0).deleting().obj()
    stuck = make_pod(job, 0, 1).running().deleting(at=T0).obj()
    waiting = run(job, [old_job], [stuck], now=T0 + timedelta(seconds=10))
    assert waiting.actions == []
    assert waiting.status.phase == "Pending"
    assert "cat-a0-1-abcde" in (waiting.status.message or "")
    assert "force-deleted" in (waiting.status.message or "")
    assert waiting.requeue_after == 2.0
    forced = run(job, [old_job], [stuck], now=T0 + timedelta(seconds=31))
    assert forced.actions == [
        Action(ActionKind.FORCE_DELETE_POD, name="cat-a0-1-abcde", uid="pod-cat-a0-1"),
        Action(ActionKind.CREATE_ATTEMPT, attempt=1),
    ]
    assert cond(forced, "Running") == ("False", "StuckPodsForceDeleted")
    assert ("Warning", "StuckPodsForceDeleted") in reasons(forced)
    assert "force-deleted 1 pod(s)" in (forced.status.message or "")
    # A pod whose deletion was not requested yet is waited for (the batch Job's deletion reaches it first).
    alive = make_pod(job, 0, 0).running().obj()
    assert run(job, [old_job], [alive, stuck], now=T0 + timedelta(days=1)).actions == []


def test_running_attempt_pods_stuck_deleting_on_a_lost_node_are_force_deleted() -> None:
    """A single-node Job replaces an evicted pod only once it is gone (podReplacementPolicy Failed): on a lost node
    that never happens by itself."""
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    batch = make_batch_job(job).obj()
    evicted = make_pod(job, 0, 0).running().deleting(at=T0).obj()
    early = run(job, [batch], [evicted], now=T0 + timedelta(seconds=10))
    assert early.actions == []
    assert early.requeue_after is not None
    assert early.requeue_after <= 20.0
    late = run(job, [batch], [evicted], now=T0 + timedelta(seconds=31))
    assert late.actions == [Action(ActionKind.FORCE_DELETE_POD, name="cat-a0-0-abcde", uid="pod-cat-a0-0")]
    assert cond(late, "Running") == ("False", "StuckPodsForceDeleted")
    assert ("Warning", "StuckPodsForceDeleted") in reasons(late)
    # A running pod that nobody deletes is left alone.
    alive = make_pod(job, 0, 0).running().obj()
    assert run(job, [batch], [alive], now=T0 + timedelta(days=1)).actions == []


def test_stuck_since_and_pod_names() -> None:
    job = make_job().obj()
    assert lost_pods.stuck_since(make_pod(job).running().obj()) is None
    deleting = make_pod(job).running().deleting(at=T0).obj()
    assert lost_pods.stuck_since(deleting) == T0 + timedelta(seconds=lost_pods.STUCK_POD_MARGIN_SECONDS)
    pods = [make_pod(job, rank=r).obj() for r in range(5)]
    assert lost_pods.pod_names(pods, limit=2) == "cat-a0-0-abcde, cat-a0-1-abcde and 3 more"

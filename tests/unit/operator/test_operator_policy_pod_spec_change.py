"""Pod-spec-change policy: an attempt that cannot start is replaced once the pod settings change."""

from __future__ import annotations

from dreambooth_operator.builders import parse_spec, pod_spec_hash
from dreambooth_operator.plan import Action, ActionKind
from dreambooth_operator.policies import pod_spec_change
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import after, attempt_of, builder, cond, run


def test_an_attempt_that_cannot_start_is_replaced_when_the_pod_settings_change() -> None:
    """A wrong image (or a nodeSelector no node matches) keeps the pods from starting; fixing spec.podTemplate
    replaces the attempt at once, without counting a failure. A running attempt keeps its pods."""
    built_from = pod_spec_hash(parse_spec(make_job().obj()))
    fixed = make_job().pod_template(image="my/trainer:fixed").status(attempt=0, phase="Pending", startTime=iso(T0))
    job = fixed.obj()
    stale = make_batch_job(job).pod_spec_hash(built_from).obj()
    for pod in (make_pod(job).image_pull("ImagePullBackOff", "no such host"), make_pod(job).unschedulable()):
        plan = run(job, [stale], [pod.obj()])
        assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]
        assert plan.status.attempt == 1
        assert plan.status.phase == "Pending"
        assert cond(plan, "Running") == ("False", "PodSpecChanged")
        assert plan.status.restarts.total == 0
    # once the old attempt is gone, the next one is created from the new spec
    nxt = run(after(job, plan), [make_batch_job(job).deleting().pod_spec_hash(built_from).obj()], [])
    assert nxt.actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=1)]

    current = make_batch_job(job).pod_spec_hash(pod_spec_hash(parse_spec(job))).obj()
    unchanged = run(job, [current], [make_pod(job).image_pull("ErrImagePull", "not found").obj()])
    assert unchanged.actions == []
    assert cond(unchanged, "Running") == ("False", "ImagePullFailed")
    running = run(job, [stale], [make_pod(job).running().obj()])
    assert all(a.kind is not ActionKind.DELETE_BATCH_JOB for a in running.actions)
    assert running.status.attempt == 0


def test_an_attempt_without_a_recorded_hash_counts_as_unchanged() -> None:
    job = make_job().pod_template(image="my/trainer:fixed").obj()
    spec = parse_spec(job)
    assert not pod_spec_change.changed(make_batch_job(job).obj(), spec)
    assert not pod_spec_change.changed(make_batch_job(job).pod_spec_hash(pod_spec_hash(spec)).obj(), spec)
    assert pod_spec_change.changed(make_batch_job(job).pod_spec_hash("0" * 16).obj(), spec)


def test_nothing_is_replaced_while_the_pods_can_start() -> None:
    job = make_job().status(attempt=0, phase="Pending", startTime=iso(T0)).obj()
    b = builder(job, batch_jobs=[make_batch_job(job).pod_spec_hash("0" * 16).obj()], pods=[make_pod(job).obj()])
    assert pod_spec_change.replace_stuck_attempt(b, parse_spec(job), attempt_of(b), None) is None
    assert b.actions == []

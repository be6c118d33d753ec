"""The Reason column (status.reason): why a job is in its phase, kept true by the status writer (issue 20)."""

from __future__ import annotations

from dreambooth_api.generate import JOB_COLUMNS
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import after, run


def test_a_failed_job_shows_the_failure_reason() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).exited(10, {"status": "failed", "reason": "InvalidInput", "message": "cat3.jpg is bad"})
    plan = run(job, [make_batch_job(job).failed("PodFailurePolicy", "x").obj()], [pod.obj()])
    assert (plan.status.phase, plan.status.reason, plan.status.message) == ("Failed", "InvalidInput", "cat3.jpg is bad")


def test_a_queued_job_shows_that_it_waits_for_admission() -> None:
    job = make_job().queue("gpu").obj()
    job = after(job, run(job))
    plan = run(job, [make_batch_job(job).suspended().obj()], [])
    assert (plan.status.phase, plan.status.reason) == ("Queued", "WaitingForAdmission")
    # Admitted, pods not up yet: the reason moves on with the phase.
    plan = run(after(job, plan), [make_batch_job(job).obj()], [make_pod(job).obj()])
    assert (plan.status.phase, plan.status.reason) == ("Pending", "PodsPending")


def test_a_job_stuck_on_its_image_or_its_gpus_says_which() -> None:
    job = make_job().status(attempt=0, phase="Pending", startTime=iso(T0)).obj()
    pulling = run(job, [make_batch_job(job).obj()], [make_pod(job).image_pull("ErrImagePull", "not found").obj()])
    assert (pulling.status.phase, pulling.status.reason) == ("Pending", "ImagePullFailed")
    assert "ErrImagePull: not found" in (pulling.status.message or "")
    waiting = run(job, [make_batch_job(job).obj()], [make_pod(job).unschedulable().obj()])
    assert (waiting.status.phase, waiting.status.reason) == ("Pending", "Unschedulable")


def test_a_running_job_shows_its_running_reason() -> None:
    job = make_job().status(attempt=0, phase="Pending", startTime=iso(T0)).obj()
    plan = run(job, [make_batch_job(job).obj()], [make_pod(job).running().obj()])
    assert plan.status.phase == "Initializing"
    assert plan.status.reason == "PodsRunning"


def test_the_job_columns_are_pinned() -> None:
    """Golden: what `kubectl get dbj` (and -o wide) prints."""
    assert [(c["name"], c["jsonPath"], c.get("priority", 0)) for c in JOB_COLUMNS] == [
        ("Phase", ".status.phase", 0),
        ("Reason", ".status.reason", 0),
        ("Progress", ".status.progressText", 0),
        ("Loss", ".status.progress.loss", 0),
        ("Restarts", ".status.restarts.total", 0),
        ("Age", ".metadata.creationTimestamp", 0),
        ("GPU-Minutes", ".status.usage.gpuMinutes", 1),
        ("Model", ".status.outputs.modelUri", 1),
        ("Score", ".status.outputs.score", 1),
        ("Message", ".status.message", 1),
    ]

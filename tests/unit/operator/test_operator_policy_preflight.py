"""Pre-flight policy: the input check `<job>-check` runs before the first GPU attempt, once; invalid input fails the
job with the check's message and 0 GPU-seconds; a storage outage or a broken check is retried by the Job controller
and then inconclusive, never a failure; a resumed job does not check again; the check's pods are no attempt's."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest

from dreambooth_operator.observed import Observed
from dreambooth_operator.plan import Action, ActionKind
from dreambooth_operator.policies.preflight import Outcome, outcome
from dreambooth_operator.reconcile import reconcile
from tests.infra.wrappers import T0, BatchJobWrapper, PodWrapper, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import NOW, after, cond, reasons, run

CHECK = [Action(ActionKind.CREATE_PREFLIGHT, name="cat-check")]
ATTEMPT = [Action(ActionKind.CREATE_ATTEMPT, attempt=0)]
PREFLIGHT_LABELS = {"dreambooth.dev/job-name": "cat", "dreambooth.dev/component": "preflight"}


def check_job(job: dict[str, Any]) -> BatchJobWrapper:
    """The job's `cat-check` batch Job, as the API returns it."""
    wrapper = make_batch_job(job)
    meta = wrapper._obj["metadata"]  # the wrapper's object, renamed as the check's
    meta.update({"name": "cat-check", "uid": "uid-cat-check", "labels": dict(PREFLIGHT_LABELS)})
    return wrapper


def check_pod(job: dict[str, Any], n: int = 0) -> PodWrapper:
    """A pod of `cat-check` (no attempt, no rank), scheduled at T0."""
    wrapper = make_pod(job, uid=f"pod-check-{n}").scheduled()
    meta = wrapper._obj["metadata"]
    meta.update({"name": f"cat-check-{n}xyzw", "labels": dict(PREFLIGHT_LABELS)})
    meta["ownerReferences"][0].update({"name": "cat-check", "uid": "uid-cat-check"})
    return wrapper


def checking(job: dict[str, Any]) -> dict[str, Any]:
    """The job once the check was created (its status written)."""
    return after(job, run(job))


def test_a_new_job_checks_its_input_before_any_gpu_job() -> None:
    job = make_job().gpus(1).obj()
    plan = run(job)
    assert plan.actions == CHECK
    assert plan.status.phase == "Pending"
    assert plan.status.message == "checking the input on a CPU-only pod (Job cat-check)"
    assert cond(plan, "InputChecked") == ("False", "CheckingInput")
    assert plan.status.reason == "CheckingInput"
    assert ("Normal", "CheckingInput") in reasons(plan)
    # While it runs: nothing more is created, and its pod holds no GPU (no attempt, no usage).
    job = after(job, plan)
    running = run(job, [check_job(job).obj()], [check_pod(job).running().obj()], now=NOW + timedelta(minutes=5))
    assert running.actions == []
    assert running.status.phase == "Pending"
    assert running.status.usage is None
    assert running.events == []


def test_a_passed_check_creates_attempt_zero_at_once_and_is_not_run_again() -> None:
    job = checking(make_job().gpus(1).obj())
    summary = "3 instance image(s) in s3://bucket/photos/ decode; bucket(s) bucket exist"
    done = check_pod(job).exited(0, {"status": "succeeded", "reason": "InputValid", "message": summary})
    plan = run(job, [check_job(job).complete().obj()], [done.obj()])
    assert plan.actions == ATTEMPT
    assert cond(plan, "InputChecked") == ("True", "InputValid")
    assert next(c for c in plan.status.conditions if c.type == "InputChecked").message == summary
    assert ("Normal", "InputValid") in reasons(plan)
    assert plan.status.phase == "Pending"
    # The GPU pod counts, the check's pod does not; nothing re-creates the check (even once it is deleted).
    job = after(job, plan)
    gpu_pod = make_pod(job).running().scheduled(T0 + timedelta(seconds=20)).obj()
    later = run(job, [make_batch_job(job).obj()], [gpu_pod, done.obj()], now=NOW + timedelta(seconds=60))
    assert later.actions == []
    assert later.status.usage is not None
    assert [r.uid for r in later.status.usage.pods] == [gpu_pod["metadata"]["uid"]]
    assert run(job).actions == ATTEMPT


@pytest.mark.parametrize(
    "message",
    [
        "bucket no-such-bucket does not exist",
        "no instance images (jpg, jpeg, png, webp) under instanceImages.uri s3://b/p/",
        "instance image s3://b/p/x.jpg is not a decodable image: cannot identify image file",
    ],
)
def test_invalid_input_fails_the_job_with_the_checks_message_and_no_gpu_time(message: str) -> None:
    job = checking(make_job().gpus(2).obj())
    pod = check_pod(job).exited(10, {"status": "failed", "reason": "InvalidInput", "message": message})
    plan = run(job, [check_job(job).obj()], [pod.obj()])  # decided on the pod, before the Job's own condition
    assert plan.actions == []
    assert plan.status.phase == "Failed"
    assert plan.status.message == message
    assert cond(plan, "Failed") == ("True", "InvalidInput")
    assert cond(plan, "InputChecked") == ("False", "InvalidInput")
    assert plan.status.usage is not None
    assert (plan.status.usage.gpu_seconds, plan.status.usage.pod_seconds, plan.status.usage.pods) == (0, 0, [])
    assert plan.status.usage.gpus_per_pod == 2
    assert [e for e in reasons(plan) if e[1] == "InvalidInput"] == [("Warning", "InvalidInput")]  # one event
    assert plan.finished
    # Terminal: the job stays Failed, and nothing is created later.
    again = run(after(job, plan), [check_job(job).failed("PodFailurePolicy").obj()], [pod.obj()])
    assert again.actions == []
    assert again.status.phase == "Failed"


def test_a_check_job_failed_by_its_policy_waits_a_little_for_its_pods_message() -> None:
    job = checking(make_job().obj())
    failed_at = NOW
    text = "Container trainer for pod team-a/cat-check-0xyzw failed with exit code 10 matching FailJob rule"
    batch = check_job(job).failed("PodFailurePolicy", text).obj()
    batch["status"]["conditions"][0]["lastTransitionTime"] = iso(failed_at)
    soon = run(job, [batch], [], now=failed_at + timedelta(seconds=5))
    assert soon.status.phase == "Pending"
    assert soon.requeue_after == 2.0
    assert soon.actions == []
    late = run(job, [batch], [], now=failed_at + timedelta(seconds=31))
    assert late.status.phase == "Failed"
    assert cond(late, "Failed") == ("True", "InvalidInput")
    assert late.status.message == text


def test_a_storage_outage_is_retried_then_inconclusive_and_the_gpu_job_starts() -> None:
    job = checking(make_job().obj())
    outage = {"status": "failed", "reason": "StorageUnavailable", "message": "object storage failed for bucket b"}
    first = check_pod(job, 0).exited(11, outage).obj()
    retry = run(job, [check_job(job).obj()], [first, check_pod(job, 1).obj()])
    assert retry.actions == []
    assert retry.status.phase == "Pending"
    assert "try 2" in (retry.status.message or "")
    assert cond(retry, "Failed") is None
    tries = [check_pod(job, n).exited(11, outage).obj() for n in range(4)]
    gave_up = check_job(job).failed("BackoffLimitExceeded", "Job has reached the specified backoff limit")
    plan = run(after(job, retry), [gave_up.obj()], tries)
    assert plan.actions == ATTEMPT
    assert cond(plan, "InputChecked") == ("False", "InputCheckInconclusive")
    text = next(c for c in plan.status.conditions if c.type == "InputChecked").message
    assert "BackoffLimitExceeded" in text
    assert "object storage failed for bucket b" in text
    assert "the GPU Job starts" in text
    assert run(after(job, plan)).actions == ATTEMPT  # inconclusive is done: not checked again


@pytest.mark.parametrize(
    ("state", "reason", "says"),
    [
        ("image_pull", "ImagePullFailed", "the input check's image cannot be pulled: ImagePullBackOff"),
        ("unschedulable", "Unschedulable", "the input check's pod cannot be scheduled: 0/2 nodes"),
    ],
)
def test_a_check_pod_that_cannot_start_says_why(state: str, reason: str, says: str) -> None:
    job = checking(make_job().obj())
    pod = getattr(make_pod(job), state)()
    pod._obj["metadata"] = check_pod(job)._obj["metadata"]
    plan = run(job, [check_job(job).obj()], [pod.obj()])
    assert plan.status.phase == "Pending"
    assert plan.status.reason == reason
    assert says in (plan.status.message or "")


@pytest.mark.parametrize(
    ("case", "job", "attempt"),
    [
        ("switched off", make_job().no_preflight().obj(), 0),
        ("created suspended", make_job().suspend().obj(), 0),
        ("a checkpoint to resume from", make_job().status(lastCheckpoint={"step": 5, "uri": "s3://b/c/5"}).obj(), 0),
        ("a later attempt", make_job().status(attempt=1).obj(), 1),
    ],
)
def test_no_check_when_switched_off_suspended_or_resuming(case: str, job: dict[str, Any], attempt: int) -> None:
    plan = run(job)
    assert plan.actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=attempt)]
    assert cond(plan, "InputChecked") is None


def test_a_queued_job_is_checked_before_it_waits_for_the_queue() -> None:
    job = make_job().queue("gpu").obj()
    plan = run(job)
    assert plan.actions == CHECK
    assert plan.status.phase == "Pending"


def test_the_check_waits_for_a_foreign_job_of_its_name() -> None:
    job = make_job().obj()
    foreign = check_job(job).owner("uid-old").obj()
    plan = run(job, [foreign], [])
    assert plan.actions == []
    assert plan.status.phase == "Pending"
    assert "cat-check" in (plan.status.message or "")


def test_a_deleted_check_job_is_waited_for_then_created_again() -> None:
    job = checking(make_job().obj())
    plan = run(job, [check_job(job).deleting().obj()], [])
    assert plan.actions == []
    assert plan.requeue_after == 2.0
    assert run(job).actions == CHECK


def test_children_are_checked_for_conflicts_before_the_check_is_created() -> None:
    job = make_job().obj()
    cm = {"kind": "ConfigMap", "metadata": {"name": "cat-config", "namespace": "team-a", "uid": "u"}}
    names = {"ConfigMap": "cat-config", "Service": "cat-workers", "NetworkPolicy": "cat-network"}
    children = {(k, n): (cm if k == "ConfigMap" else None) for k, n in names.items()}
    plan = reconcile(Observed(job=job, batch_jobs=[], pods=[], now=NOW, children=children))
    assert plan.actions == []
    assert cond(plan, "ChildConflict") == ("True", "ChildConflict")


@pytest.mark.parametrize(
    ("batch", "pods", "want"),
    [
        ({}, [], Outcome.RUNNING),
        ({"conditions": [{"type": "Complete", "status": "True"}]}, [], Outcome.PASSED),
        (
            {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]},
            [],
            Outcome.INCONCLUSIVE,
        ),
        ({"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}, [], Outcome.INVALID),
        ({}, [10], Outcome.INVALID),
        ({}, [11, 137], Outcome.RUNNING),
    ],
)
def test_outcome(batch: dict[str, Any], pods: list[int], want: Outcome) -> None:
    job = make_job().obj()
    observed = [check_pod(job, n).exited(code).obj() for n, code in enumerate(pods)]
    assert outcome({"status": batch}, observed)[0] is want


def test_a_check_stuck_on_a_bad_image_is_replaced_once_the_spec_is_fixed() -> None:
    """As pod_spec_change does for an attempt: the check is built from the new spec, no failure is counted."""
    from dreambooth_operator.builders import parse_spec, pod_spec_hash

    bad = checking(make_job().pod_template(image="registry.invalid/t:typo").obj())
    pod = make_pod(bad).image_pull()
    pod._obj["metadata"] = check_pod(bad)._obj["metadata"]
    built = pod_spec_hash(parse_spec(bad))
    stuck = check_job(bad).pod_spec_hash(built).obj()
    # Not changed: it stays, and says why.
    assert run(bad, [stuck], [pod.obj()]).status.reason == "ImagePullFailed"
    fixed = copy.deepcopy(bad)
    fixed["spec"]["podTemplate"]["image"] = "ghcr.io/dreambooth-operator/trainer:0.1.0"
    plan = run(fixed, [stuck], [pod.obj()])
    assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-check")]
    assert plan.status.phase == "Pending"
    assert ("Normal", "PodSpecChanged") in reasons(plan)
    assert plan.status.restarts.total == 0
    # Once it is gone, a new check is created (from the fixed spec).
    assert run(after(fixed, plan)).actions == CHECK

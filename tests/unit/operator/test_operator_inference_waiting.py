"""An InferenceService whose `fromJob` does not exist yet waits (Pending, WaitingForJob) instead of failing, and
recovers by itself once the job appears and succeeds (issue 20); status.reason carries the Ready condition's reason
(the Reason column), and one transition gives one event."""

from __future__ import annotations

from typing import Any

from dreambooth_operator.inference import reconcile_inference
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import T0

SETTINGS = OperatorSettings(trainer_image="trainer:test", network_policies=False)


def isvc(status: dict[str, Any] | None = None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "dog", "namespace": "ns", "uid": "uid-dog", "generation": 1},
        "spec": spec or {"model": {"fromJob": "cat"}},
        "status": status or {},
    }


def job(phase: str | None, model_uri: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase} if phase else {}
    if phase == "Failed":
        status["message"] = "instance image cat3.jpg is not a decodable image"
    if model_uri:
        status["outputs"] = {"modelUri": model_uri}
    return {"metadata": {"name": "cat"}, "spec": {"baseModel": {"tiny": True}}, "status": status}


def test_a_missing_job_is_waited_for_and_the_service_recovers_when_it_succeeds() -> None:
    missing = reconcile_inference(isvc(), None, None, SETTINGS, T0)
    assert (missing.status.phase, missing.status.reason) == ("Pending", "WaitingForJob")
    assert missing.status.message == (
        "DreamBoothJob cat does not exist (yet); the service starts once it exists and succeeds"
    )
    assert missing.children == []
    # ModelResolved and Ready both change with one reason: one Normal event, not a Warning.
    assert [(t, r) for t, r, _ in missing.events] == [("Normal", "WaitingForJob")]

    created = reconcile_inference(isvc(missing.status.to_wire()), job(None), None, SETTINGS, T0)
    assert (created.status.phase, created.status.reason) == ("Pending", "WaitingForJob")
    assert created.status.message == "waiting for DreamBoothJob cat to succeed (phase not set yet)"
    assert created.events == []  # the same transition, still waiting

    running = reconcile_inference(isvc(created.status.to_wire()), job("Running"), None, SETTINGS, T0)
    assert (running.status.phase, running.status.reason) == ("Pending", "WaitingForJob")
    assert running.events == []

    done = reconcile_inference(isvc(running.status.to_wire()), job("Succeeded", "s3://b/m"), None, SETTINGS, T0)
    assert (done.status.phase, done.status.reason) == ("Loading", "ReplicasNotReady")
    assert done.status.model_uri == "s3://b/m"
    assert [c["kind"] for c in done.children] == ["Deployment", "Service"]


def test_only_a_failed_job_fails_the_service_and_the_message_says_what_to_do() -> None:
    plan = reconcile_inference(isvc(), job("Failed"), None, SETTINGS, T0)
    assert (plan.status.phase, plan.status.reason) == ("Failed", "SourceJobFailed")
    assert plan.status.message is not None
    assert "cat3.jpg" in plan.status.message
    assert "train it again" in plan.status.message
    assert [(t, r) for t, r, _ in plan.events] == [("Warning", "SourceJobFailed")]


def test_an_invalid_spec_has_its_reason_and_one_warning() -> None:
    plan = reconcile_inference(isvc(spec={"model": {}}), None, None, SETTINGS, T0)
    assert (plan.status.phase, plan.status.reason) == ("Failed", "InvalidSpec")
    assert plan.status.message is not None
    assert plan.status.message.endswith("; fix the spec and apply it again")
    assert [(t, r) for t, r, _ in plan.events] == [("Warning", "InvalidSpec")]

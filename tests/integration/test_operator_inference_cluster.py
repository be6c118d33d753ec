"""InferenceService against a real control plane: waits for its source job, then deploys the sampling server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.controlplane import Cluster
from tests.infra.inference import inference_service
from tests.infra.operator import OperatorProcess, apply, as_manifest, condition, get, running_operator, wait_for
from tests.infra.wrappers import make_job

NOWHERE = {"dbo.test/no-such-node": "true"}
AUTOSCALED = {"minReplicas": 2, "maxReplicas": 5}
OPERATOR, HANDOVER = "dreambooth-operator/Apply", "dreambooth-operator-handover/Apply"
Predicate = Callable[[dict[str, Any]], bool]
# The operator's namespaces enforce Pod Security "restricted" (operator_harness.py).
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


@pytest.fixture
def op(cluster: Cluster, namespace: str, infra_log_dir: Path) -> Iterator[OperatorProcess]:
    with running_operator(cluster, infra_log_dir, [namespace]) as operator:
        yield operator


@pytest.fixture
def op_on_events_only(cluster: Cluster, namespace: str, infra_log_dir: Path) -> Iterator[OperatorProcess]:
    """An operator whose periodic reconcile never comes during a test: only watch events start reconciles."""
    env = {"DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS": "3600"}
    with running_operator(cluster, infra_log_dir, [namespace], env) as operator:
        yield operator


def unschedulable(name: str, model: dict[str, Any], scaling: dict[str, int]) -> dict[str, Any]:
    """An InferenceService whose pods stay Pending (no node matches): the tests look at the objects only."""
    return inference_service(name, model, scaling=scaling, podTemplate={"nodeSelector": NOWHERE})


def wait_on(
    cluster: Cluster, namespace: str, op: OperatorProcess, kind: str, name: str, what: str, predicate: Predicate
) -> dict[str, Any]:
    """Poll the object until `predicate` holds (`what` names the wait in the error); return it."""
    found: dict[str, Any] = wait_for(what, lambda: get(cluster, kind, name, namespace), predicate, op=op)
    return found


def is_phase(phase: str) -> Predicate:
    return lambda obj: (obj.get("status") or {}).get("phase") == phase


def patch_status(cluster: Cluster, namespace: str, kind: str, name: str, status: dict[str, Any]) -> None:
    """Merge `status` into the object's status through the status subresource (as its controller would)."""
    patch = json.dumps({"status": status})
    cluster.kubectl("patch", kind, name, "-n", namespace, "--subresource=status", "--type=merge", "-p", patch)


def replicas_owners(cluster: Cluster, namespace: str, name: str) -> tuple[int, set[str]] | None:
    """The Deployment's spec.replicas and the field managers that own it (managedFields); None before it exists."""
    args = ["get", "deployment", name, "-n", namespace, "-o", "json", "--show-managed-fields"]
    shown = cluster.kubectl(*args, check=False)
    if shown.returncode != 0:
        return None
    deployment = json.loads(shown.stdout)
    owners = {
        f"{f['manager']}/{f['operation']}"
        for f in deployment["metadata"]["managedFields"]
        if "f:replicas" in (f.get("fieldsV1") or {}).get("f:spec", {})
    }
    return int(deployment["spec"]["replicas"]), owners


def test_inference_service_from_job(cluster: Cluster, namespace: str, op_on_events_only: OperatorProcess) -> None:
    """With no periodic reconcile, the source job's success alone starts the waiting service's deployment."""
    op = op_on_events_only
    model_uri = "s3://bkt/out/cat/model"
    apply(cluster, as_manifest(make_job("cat").pod_template(nodeSelector=NOWHERE).obj()), namespace)
    apply(cluster, unschedulable("cat-server", {"fromJob": "cat"}, {"replicas": 1}), namespace)
    waiting = wait_on(
        cluster, namespace, op, "inferenceservice", "cat-server", "WaitingForJob",
        lambda s: (condition(s, "ModelResolved") or {}).get("reason") == "WaitingForJob",
    )  # fmt: skip
    assert waiting["status"]["phase"] == "Pending"
    assert get(cluster, "deployment", "cat-server", namespace) is None
    # The job succeeds (written as the operator would, through the status subresource; terminal is sticky).
    patch_status(cluster, namespace, "dreamboothjob", "cat", {"phase": "Succeeded", "outputs": {"modelUri": model_uri}})
    loading = wait_on(cluster, namespace, op, "inferenceservice", "cat-server", "Loading", is_phase("Loading"))
    assert loading["status"]["modelUri"] == model_uri
    assert loading["status"]["url"] == f"http://cat-server.{namespace}.svc:80"
    deployment = get(cluster, "deployment", "cat-server", namespace)
    service = get(cluster, "service", "cat-server", namespace)
    assert deployment is not None
    assert service is not None
    for child in (deployment, service):
        assert [r["name"] for r in child["metadata"]["ownerReferences"]] == ["cat-server"]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["DREAMBOOTH_SERVE_CONFIG"]["value"])["modelUri"] == model_uri
    assert get(cluster, "dreamboothjob", "cat", namespace)["status"]["phase"] == "Succeeded"  # type: ignore[index]


def test_autoscaling_hands_the_replica_count_to_an_hpa(cluster: Cluster, namespace: str, op: OperatorProcess) -> None:
    model = {"modelUri": "s3://bkt/out/auto/model", "baseModel": {"tiny": True}}
    apply(cluster, unschedulable("auto", model, AUTOSCALED | {"targetInflightRequests": 3}), namespace)
    hpa = wait_on(cluster, namespace, op, "horizontalpodautoscaler.v2.autoscaling", "auto", "HPA", bool)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "auto"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert hpa["spec"]["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "3"}
    assert [r["name"] for r in hpa["metadata"]["ownerReferences"]] == ["auto"]
    # Created at minReplicas, then the count is handed over: the operator's own apply no longer sets it. (The test
    # control plane runs no HPA controller, so the count stays at 2.)
    wait_for(
        "the replica count handed over",
        lambda: replicas_owners(cluster, namespace, "auto"),
        lambda r: r == (2, {HANDOVER}),
        op=op,
    )
    loading = wait_on(cluster, namespace, op, "inferenceservice", "auto", "Loading", is_phase("Loading"))
    assert loading["status"]["message"] == "0/2 replicas ready; loading the model"
    assert "servedModelUri" not in loading["status"]


def test_switching_to_autoscaling_keeps_the_running_replicas(
    cluster: Cluster, namespace: str, op: OperatorProcess
) -> None:
    model = {"modelUri": "s3://bkt/out/switch/model", "baseModel": {"tiny": True}}
    apply(cluster, unschedulable("switch", model, {"replicas": 3}), namespace)
    wait_for(
        "3 fixed replicas", lambda: replicas_owners(cluster, namespace, "switch"), lambda r: r == (3, {OPERATOR}), op=op
    )
    # Fixed -> autoscaling: the HPA takes over the live count (3, within 2..5); it is never reset to the default of 1
    # when the operator's apply stops setting it.
    apply(cluster, unschedulable("switch", model, AUTOSCALED), namespace)
    wait_on(cluster, namespace, op, "horizontalpodautoscaler.v2.autoscaling", "switch", "HPA", bool)
    wait_for(
        "the replica count handed over",
        lambda: replicas_owners(cluster, namespace, "switch"),
        lambda r: r[1] == {HANDOVER},
        op=op,
    )
    assert replicas_owners(cluster, namespace, "switch") == (3, {HANDOVER})
    # Autoscaling -> fixed: the operator sets the count again, and deletes the HPA.
    apply(cluster, unschedulable("switch", model, {"replicas": 4}), namespace)
    wait_for(
        "4 fixed replicas", lambda: replicas_owners(cluster, namespace, "switch"), lambda r: r == (4, {OPERATOR}), op=op
    )
    wait_for(
        "the HPA deleted",
        lambda: get(cluster, "horizontalpodautoscaler.v2.autoscaling", "switch", namespace) or {},
        lambda h: not h,
        op=op,
    )


def test_a_server_that_failed_to_load_its_model_is_reported(
    cluster: Cluster, namespace: str, op_on_events_only: OperatorProcess
) -> None:
    """The operator lists the service's pods and reports a crashed server's termination message. It watches the
    serving pods: with no periodic reconcile, the pod's change alone makes the service Failed."""
    op = op_on_events_only
    model = {"modelUri": "s3://bkt/out/broken/model.safetensors"}
    apply(cluster, unschedulable("broken", model, {"replicas": 1}), namespace)
    wait_on(cluster, namespace, op, "inferenceservice", "broken", "Loading", is_phase("Loading"))
    # The Deployment's own changes (which wake the service too) are over: its one pod stays Pending.
    wait_on(
        cluster, namespace, op, "deployment", "broken", "the Deployment's status",
        lambda d: (d.get("status") or {}).get("unavailableReplicas") == 1,
    )  # fmt: skip
    # A serving pod as the kubelet reports it after the server exited 1 (written through the status subresource).
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "broken-crashed", "labels": {"dreambooth.dev/inference-service": "broken"}},
        "spec": {
            "nodeSelector": NOWHERE,
            "containers": [{"name": "server", "image": "trainer:test", "securityContext": RESTRICTED_CONTAINER}],
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        },
    }
    apply(cluster, pod, namespace)
    message = json.dumps({"status": "failed", "reason": "ModelLoadFailed", "message": "ValueError: no model"})
    terminated = {"exitCode": 1, "reason": "Error", "message": message, "startedAt": None, "finishedAt": None}
    server = {
        "name": "server",
        "image": "trainer:test",
        "imageID": "",
        "ready": False,
        "restartCount": 1,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": terminated},
    }
    patch_status(cluster, namespace, "pod", "broken-crashed", {"containerStatuses": [server]})
    failed = wait_on(
        cluster, namespace, op, "inferenceservice", "broken", "ModelLoadFailed",
        lambda s: (condition(s, "Ready") or {}).get("reason") == "ModelLoadFailed",
    )  # fmt: skip
    assert failed["status"]["phase"] == "Failed"
    assert failed["status"]["message"] == "the server failed to load the model: ValueError: no model"


def test_a_service_of_the_same_name_that_it_does_not_own_survives_untouched(
    cluster: Cluster, namespace: str, op: OperatorProcess
) -> None:
    theirs = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "labels": {"team": "theirs"}},
        "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 443}]},
    }
    apply(cluster, theirs, namespace)
    before = get(cluster, "service", "web", namespace)
    assert before is not None
    apply(cluster, unschedulable("web", {"modelUri": "s3://bkt/out/web/model"}, {"replicas": 1}), namespace)
    conflicted = wait_on(
        cluster, namespace, op, "inferenceservice", "web", "ChildConflict",
        lambda s: (condition(s, "ChildConflict") or {}).get("status") == "True",
    )  # fmt: skip
    assert conflicted["status"]["phase"] == "Pending"
    assert (condition(conflicted, "Ready") or {}).get("reason") == "ChildConflict"
    assert "the Service web already exists and is not controlled by this resource" in conflicted["status"]["message"]
    # Nothing is applied while the name is taken, not even the Deployment; the Service is as it was.
    assert get(cluster, "deployment", "web", namespace) is None
    after = get(cluster, "service", "web", namespace)
    assert after is not None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    reasons = [
        e.get("reason")
        for e in json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    ]
    assert "ChildConflict" in reasons


def lora_job(name: str, team: str) -> dict[str, Any]:
    """A LoRA DreamBoothJob labelled team=`team` whose pods never run (the test writes its success)."""
    job = make_job(name).label("team", team).training(method="lora").pod_template(nodeSelector=NOWHERE).obj()
    job["spec"]["output"]["formats"] = ["lora"]
    return as_manifest(job)


def succeed(cluster: Cluster, namespace: str, name: str) -> None:
    outputs = {"modelUri": f"s3://bucket/out/{name}/lora"}
    patch_status(cluster, namespace, "dreamboothjob", name, {"phase": "Succeeded", "outputs": outputs})


def subjects_of(cluster: Cluster, namespace: str, name: str) -> dict[str, str] | None:
    configmap = get(cluster, "configmap", f"{name}-subjects", namespace)
    return None if configmap is None else json.loads(configmap["data"]["subjects.json"])


def test_a_job_that_succeeds_later_is_published_without_a_rollout(
    cluster: Cluster, namespace: str, op_on_events_only: OperatorProcess
) -> None:
    """spec.subjects: with no periodic reconcile, a matching job's success alone adds it to the subjects ConfigMap;
    the Deployment's pod template (and so its pods) stays as it was."""
    op = op_on_events_only
    for name, team in (("dog", "avatars"), ("owl", "birds")):
        apply(cluster, lora_job(name, team), namespace)
        succeed(cluster, namespace, name)
    service = unschedulable("avatars", {"modelUri": "s3://bucket/base/model"}, {"replicas": 1})
    service["spec"]["subjects"] = {"matchExpressions": [{"key": "team", "operator": "In", "values": ["avatars"]}]}
    apply(cluster, service, namespace)
    first = wait_on(
        cluster, namespace, op, "inferenceservice", "avatars", "one subject",
        lambda s: (s.get("status") or {}).get("subjects") == 1,
    )  # fmt: skip
    assert first["status"]["phase"] == "Loading"
    assert subjects_of(cluster, namespace, "avatars") == {"dog": "s3://bucket/out/dog/lora"}
    configmap = get(cluster, "configmap", "avatars-subjects", namespace)
    assert configmap is not None
    assert [r["name"] for r in configmap["metadata"]["ownerReferences"]] == ["avatars"]
    before = get(cluster, "deployment", "avatars", namespace)
    assert before is not None
    pod = before["spec"]["template"]["spec"]
    assert {"name": "subjects", "configMap": {"name": "avatars-subjects", "optional": True, "defaultMode": 420}} in (
        pod["volumes"]
    )
    # A second matching job succeeds later (after the first reconcile wrote its status).
    apply(cluster, lora_job("cat", "avatars"), namespace)
    succeed(cluster, namespace, "cat")
    wait_on(
        cluster, namespace, op, "inferenceservice", "avatars", "two subjects",
        lambda s: (s.get("status") or {}).get("subjects") == 2,
    )  # fmt: skip
    assert subjects_of(cluster, namespace, "avatars") == {
        "cat": "s3://bucket/out/cat/lora",
        "dog": "s3://bucket/out/dog/lora",
    }
    after = get(cluster, "deployment", "avatars", namespace)
    assert after is not None
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["spec"]["template"] == before["spec"]["template"]

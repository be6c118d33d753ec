"""InferenceService against a real control plane: waits for its source job, then deploys the sampling server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from operator_harness import OperatorProcess, apply, as_manifest, condition, get, running_operator, wait_for
from operator_wrappers import make_job

from tests.infra.controlplane import Cluster

NOWHERE = {"dbo.test/no-such-node": "true"}


@pytest.fixture
def op(cluster: Cluster, namespace: str, infra_log_dir: Path) -> Iterator[OperatorProcess]:
    with running_operator(cluster, infra_log_dir, [namespace]) as operator:
        yield operator


def test_inference_service_from_job(cluster: Cluster, namespace: str, op: OperatorProcess) -> None:
    apply(cluster, as_manifest(make_job("cat").pod_template(nodeSelector=NOWHERE).obj()), namespace)
    isvc = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "cat-server"},
        "spec": {
            "model": {"fromJob": "cat"},
            "scaling": {"replicas": 1},
            "resources": {"gpus": 0},
            "podTemplate": {"nodeSelector": NOWHERE},
        },
    }
    apply(cluster, isvc, namespace)
    waiting = wait_for(
        "WaitingForJob",
        lambda: get(cluster, "inferenceservice", "cat-server", namespace),
        lambda s: (condition(s, "ModelResolved") or {}).get("reason") == "WaitingForJob",
        op=op,
    )
    assert waiting["status"]["phase"] == "Pending"
    assert get(cluster, "deployment", "cat-server", namespace) is None
    # The job succeeds (written as the operator would, through the status subresource; terminal is sticky).
    status = {"status": {"phase": "Succeeded", "outputs": {"modelUri": "s3://bkt/out/cat/model"}}}
    cluster.kubectl(
        "patch", "dreamboothjob", "cat", "-n", namespace, "--subresource=status", "--type=merge", "-p",
        json.dumps(status),
    )  # fmt: skip
    loading = wait_for(
        "Loading",
        lambda: get(cluster, "inferenceservice", "cat-server", namespace),
        lambda s: (s.get("status") or {}).get("phase") == "Loading",
        op=op,
    )
    assert loading["status"]["modelUri"] == "s3://bkt/out/cat/model"
    assert loading["status"]["url"] == f"http://cat-server.{namespace}.svc:80"
    deployment = get(cluster, "deployment", "cat-server", namespace)
    service = get(cluster, "service", "cat-server", namespace)
    assert deployment is not None
    assert service is not None
    for child in (deployment, service):
        assert [r["name"] for r in child["metadata"]["ownerReferences"]] == ["cat-server"]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["DREAMBOOTH_SERVE_CONFIG"]["value"])["modelUri"] == "s3://bkt/out/cat/model"
    assert get(cluster, "dreamboothjob", "cat", namespace)["status"]["phase"] == "Succeeded"  # type: ignore[index]


def test_autoscaling_hands_the_replica_count_to_an_hpa(cluster: Cluster, namespace: str, op: OperatorProcess) -> None:
    isvc = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "auto"},
        "spec": {
            "model": {"modelUri": "s3://bkt/out/auto/model", "baseModel": {"tiny": True}},
            "scaling": {"minReplicas": 2, "maxReplicas": 5, "targetInflightRequests": 3},
            "resources": {"gpus": 0},
            "podTemplate": {"nodeSelector": NOWHERE},
        },
    }
    apply(cluster, isvc, namespace)
    hpa = wait_for(
        "HPA", lambda: get(cluster, "horizontalpodautoscaler.v2.autoscaling", "auto", namespace), bool, op=op
    )
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "auto"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert hpa["spec"]["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "3"}
    assert [r["name"] for r in hpa["metadata"]["ownerReferences"]] == ["auto"]
    shown = cluster.kubectl("get", "deployment", "auto", "-n", namespace, "-o", "json", "--show-managed-fields")
    deployment = json.loads(shown.stdout)
    managed = [f for f in deployment["metadata"]["managedFields"] if f["manager"] == "dreambooth-operator"]
    assert managed
    assert all("f:replicas" not in (f.get("fieldsV1") or {}).get("f:spec", {}) for f in managed)
    # The test control plane runs no HPA controller, so the count stays at the API server's default of 1.
    assert deployment["spec"]["replicas"] == 1
    loading = wait_for(
        "Loading",
        lambda: get(cluster, "inferenceservice", "auto", namespace),
        lambda s: (s.get("status") or {}).get("phase") == "Loading",
        op=op,
    )
    assert loading["status"]["message"] == "0/1 replicas ready; loading the model"
    assert "servedModelUri" not in loading["status"]


def test_a_server_that_failed_to_load_its_model_is_reported(
    cluster: Cluster, namespace: str, op: OperatorProcess
) -> None:
    """The operator lists the service's pods and reports a crashed server's termination message."""
    isvc = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "broken"},
        "spec": {
            "model": {"modelUri": "s3://bkt/out/broken/model.safetensors"},
            "scaling": {"replicas": 1},
            "resources": {"gpus": 0},
            "podTemplate": {"nodeSelector": NOWHERE},
        },
    }
    apply(cluster, isvc, namespace)
    wait_for(
        "Loading",
        lambda: get(cluster, "inferenceservice", "broken", namespace),
        lambda s: (s.get("status") or {}).get("phase") == "Loading",
        op=op,
    )
    # A serving pod as the kubelet reports it after the server exited 1 (written through the status subresource).
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "broken-crashed", "labels": {"dreambooth.dev/inference-service": "broken"}},
        "spec": {"nodeSelector": NOWHERE, "containers": [{"name": "server", "image": "trainer:test"}]},
    }
    apply(cluster, pod, namespace)
    message = json.dumps({"status": "failed", "reason": "ModelLoadFailed", "message": "ValueError: no model"})
    terminated = {"exitCode": 1, "reason": "Error", "message": message, "startedAt": None, "finishedAt": None}
    status = {
        "status": {
            "containerStatuses": [
                {
                    "name": "server",
                    "image": "trainer:test",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 1,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": terminated},
                }
            ]
        }
    }
    cluster.kubectl(
        "patch", "pod", "broken-crashed", "-n", namespace, "--subresource=status", "--type=merge", "-p",
        json.dumps(status),
    )  # fmt: skip
    failed = wait_for(
        "ModelLoadFailed",
        lambda: get(cluster, "inferenceservice", "broken", namespace),
        lambda s: (condition(s, "Ready") or {}).get("reason") == "ModelLoadFailed",
        op=op,
    )
    assert failed["status"]["phase"] == "Failed"
    assert failed["status"]["message"] == "the server failed to load the model: ValueError: no model"

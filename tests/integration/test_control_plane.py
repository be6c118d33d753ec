"""The test control plane behaves like a real cluster: version, RBAC, controllers, scheduler, GC, namespaces."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.infra.controlplane import Cluster
from tests.infra.etcd import start_etcd
from tests.infra.paths import TESTS
from tests.infra.processes import free_port, wait_until

VERSIONS_ENV = TESTS / "infra" / "versions.env"
# No node ever carries this label, so pods stay Pending even when the node agent has registered nodes.
UNSCHEDULABLE = {"dbo.test/no-such-node": "true"}


def pinned_kubernetes_version() -> str:
    for line in VERSIONS_ENV.read_text().splitlines():
        if line.startswith("KUBERNETES_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"KUBERNETES_VERSION missing from {VERSIONS_ENV}")


def get_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_kubectl_reports_the_pinned_server_version(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == pinned_kubernetes_version()


def test_rbac_forbids_the_restricted_user_and_allows_the_admin(cluster: Cluster, namespace: str) -> None:
    denied = cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=cluster.restricted_kubeconfig, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert cluster.restricted_user in denied.stderr

    allowed = cluster.kubectl("get", "pods", "-n", namespace, "-o", "json")
    assert json.loads(allowed.stdout)["items"] == []

    with cluster.api_client(cluster.restricted_token) as api, pytest.raises(ApiException) as excinfo:
        client.CoreV1Api(api).list_namespaced_pod(namespace)
    assert excinfo.value.status == 403


def test_api_client_acts_as_admin(cluster: Cluster, namespace: str) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        names = {ns.metadata.name for ns in core.list_namespace().items}
        review = client.AuthenticationV1Api(api).create_self_subject_review(
            client.V1SelfSubjectReview(api_version="authentication.k8s.io/v1", kind="SelfSubjectReview")
        )
    assert namespace in names
    assert review.status.user_info.username == cluster.admin_user
    assert "system:masters" in review.status.user_info.groups


def deployment_manifest(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": UNSCHEDULABLE,
                    "containers": [{"name": "main", "image": "busybox:1.36", "command": ["sleep", "3600"]}],
                },
            },
        },
    }


def test_deployment_creates_replicaset_and_pending_pod_and_gc_removes_them(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment_manifest("web")))

    def pods() -> list[dict[str, Any]]:
        return list(get_json(cluster, "pods", "-n", namespace, "-l", "app=web")["items"])

    wait_until(lambda: len(pods()) == 1, what="the Deployment's pod", timeout=120)
    replicasets = get_json(cluster, "replicasets", "-n", namespace, "-l", "app=web")["items"]
    assert len(replicasets) == 1
    assert replicasets[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    pod = pods()[0]
    assert pod["metadata"]["ownerReferences"][0]["name"] == replicasets[0]["metadata"]["name"]
    assert pod["spec"]["serviceAccountName"] == "default"

    # The scheduler runs: it marks the pod unschedulable (no node matches) and it stays Pending.
    def unschedulable() -> bool:
        conditions = pods()[0].get("status", {}).get("conditions", [])
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions)

    wait_until(unschedulable, what="PodScheduled=False/Unschedulable", timeout=120)
    assert pods()[0]["status"]["phase"] == "Pending"

    cluster.kubectl("delete", "deployment", "web", "-n", namespace, "--cascade=background", "--wait=false")

    def collected() -> bool:
        rs = get_json(cluster, "replicasets", "-n", namespace, "-l", "app=web")["items"]
        return not rs and not pods()

    wait_until(collected, what="garbage collection of the ReplicaSet and Pod", timeout=120)


def test_indexed_job_creates_one_pod_per_completion_index(cluster: Cluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "gang"},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": UNSCHEDULABLE,
                    "containers": [{"name": "main", "image": "busybox:1.36", "command": ["true"]}],
                }
            },
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))

    def indexes() -> list[str]:
        items = get_json(cluster, "pods", "-n", namespace, "-l", "job-name=gang")["items"]
        return sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in items)

    wait_until(lambda: indexes() == ["0", "1"], what="two Job pods with completion indexes 0 and 1", timeout=120)


def test_namespace_deletion_completes(cluster: Cluster) -> None:
    name = cluster.create_namespace("t-delete")
    cluster.kubectl("create", "configmap", "data", "-n", name, "--from-literal=key=value")
    cluster.kubectl("delete", "namespace", name, "--wait=false")

    def gone() -> bool:
        result = cluster.kubectl("get", "namespace", name, check=False)
        return result.returncode != 0 and "NotFound" in result.stderr

    wait_until(gone, what=f"namespace {name} to be deleted (namespace controller)", timeout=120)


def test_new_namespaces_get_the_root_ca_configmap(cluster: Cluster, namespace: str) -> None:
    def published() -> bool:
        result = cluster.kubectl("get", "configmap", "kube-root-ca.crt", "-n", namespace, "-o", "json", check=False)
        return result.returncode == 0

    wait_until(published, what="kube-root-ca.crt in the new namespace", timeout=60)
    data = get_json(cluster, "configmap", "kube-root-ca.crt", "-n", namespace)["data"]["ca.crt"]
    assert data.strip() == cluster.ca_file.read_text().strip()


def test_etcd_recovers_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        etcd = start_etcd(tmp_path / "data", tmp_path / "logs", ports=(taken, free_port()))
        try:
            etcd.wait_ready(timeout=60)
            assert etcd.client_url != f"http://127.0.0.1:{taken}"
            assert etcd.healthy()
        finally:
            etcd.stop()
    assert "address already in use" in (tmp_path / "logs" / "etcd.log").read_text()

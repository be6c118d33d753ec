"""The operator's API calls that the reconcile plans rely on, against the real kube-apiserver (no kubelet runs)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

from kubernetes import client

from dreambooth_api.job import DreamBoothJobStatus
from dreambooth_operator import kube
from dreambooth_operator.handlers.jobs import execute
from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.plan import Action, ActionKind, Plan
from tests.infra.controlplane import Cluster


def _api(cluster: Cluster) -> client.ApiClient:
    return client.ApiClient(cluster.configuration())


def _pod_on_a_lost_node(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """A pod bound to a node with no kubelet: a graceful delete leaves it Terminating for good, as on a dead node."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": "lost-node", "containers": [{"name": "trainer", "image": "trainer:dev"}]},
    }
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod))
    cluster.kubectl("delete", "pod", name, "-n", namespace, "--wait=false", "--grace-period=30")
    obj = json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)
    assert obj["metadata"].get("deletionTimestamp"), "a graceful delete on a lost node must leave the pod Terminating"
    return dict(obj)


def _exists(cluster: Cluster, namespace: str, name: str) -> bool:
    out = cluster.kubectl("get", "pod", name, "-n", namespace, "--ignore-not-found", "-o", "name").stdout
    return bool(out.strip())


def test_force_delete_removes_a_pod_stuck_terminating_and_respects_the_uid(cluster: Cluster, namespace: str) -> None:
    api = _api(cluster)
    state = cast("OperatorState", SimpleNamespace(api=api))
    job = {"metadata": {"name": "cat", "namespace": namespace, "uid": "job-uid"}}
    stuck = _pod_on_a_lost_node(cluster, namespace, "cat-a0-1-stuck")

    # A uid precondition that names another object (a same-named successor) deletes nothing and is not an error.
    wrong = Action(ActionKind.FORCE_DELETE_POD, name="cat-a0-1-stuck", uid="not-it")
    execute(state, job, [], Plan(status=DreamBoothJobStatus(), actions=[wrong]))
    assert _exists(cluster, namespace, "cat-a0-1-stuck")

    right = Action(ActionKind.FORCE_DELETE_POD, name="cat-a0-1-stuck", uid=stuck["metadata"]["uid"])
    execute(state, job, [], Plan(status=DreamBoothJobStatus(), actions=[right]))
    assert not _exists(cluster, namespace, "cat-a0-1-stuck")
    # Deleting again (the next reconcile before the index caught up) is a no-op.
    assert kube.delete(api, "v1", "Pod", namespace, "cat-a0-1-stuck", grace_period_seconds=0) is False

"""The operator's API calls that the reconcile plans rely on, against the real kube-apiserver (no kubelet runs)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kubernetes import client

from dreambooth_api.job import DreamBoothJobStatus
from dreambooth_operator import kube
from dreambooth_operator.handlers.jobs import execute
from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.plan import Action, ActionKind, Plan
from dreambooth_operator.settings import OperatorSettings
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


# --- children are never clobbered ------------------------------------------------------------------------------


def _owner(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """A real object to own the children (a dangling owner reference would have them garbage-collected); its kind
    does not matter to the ownership checks, only its uid."""
    cluster.kubectl("create", "configmap", "cat", "-n", namespace)
    owner = json.loads(cluster.kubectl("get", "configmap", "cat", "-n", namespace, "-o", "json").stdout)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": owner["metadata"]}


def _configmap(namespace: str, data: dict[str, str], owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "cat-config", "namespace": namespace, "labels": {"dreambooth.dev/job-name": "cat"}}
    if owner is not None:
        ref = {k: owner[k] for k in ("apiVersion", "kind")} | {"name": owner["metadata"]["name"]}
        meta["ownerReferences"] = [ref | {"uid": owner["metadata"]["uid"], "controller": True}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _managers(obj: dict[str, Any]) -> set[str]:
    return {f"{f['manager']}/{f['operation']}" for f in obj["metadata"].get("managedFields") or []}


def test_ensure_child_creates_updates_its_own_and_never_touches_a_foreign_object(
    cluster: Cluster, namespace: str
) -> None:
    api = _api(cluster)
    owner = _owner(cluster, namespace)
    # Absent: created, and owned by the operator's apply alone (the create's Update entry is turned into it).
    created = kube.ensure_child(api, _configmap(namespace, {"a": "1"}, owner), owner)
    assert _managers(created) == {"dreambooth-operator/Apply"}
    # Owned: updated by an unforced apply.
    updated = kube.ensure_child(api, _configmap(namespace, {"a": "2"}, owner), owner)
    assert (updated["data"], updated["metadata"]["uid"]) == ({"a": "2"}, created["metadata"]["uid"])
    # Another manager changed a field the operator sets: not overwritten, reported.
    cluster.kubectl("patch", "configmap", "cat-config", "-n", namespace, "--type=merge", "-p", '{"data":{"a":"9"}}')
    with pytest.raises(kube.FieldConflictError) as conflict:
        kube.ensure_child(api, _configmap(namespace, {"a": "3"}, owner), owner)
    assert conflict.value.managers == {"kubectl-patch"}
    assert ".data.a" in conflict.value.fields
    assert kube.get(api, "v1", "ConfigMap", namespace, "cat-config")["data"] == {"a": "9"}

    # A foreign object (no controller) of the child's name: neither changed nor deleted.
    cluster.kubectl("delete", "configmap", "cat-config", "-n", namespace)
    cluster.kubectl("create", "configmap", "cat-config", "-n", namespace, "--from-literal=mine=yes")
    before = kube.get(api, "v1", "ConfigMap", namespace, "cat-config")
    with pytest.raises(kube.ForeignChildError) as foreign:
        kube.ensure_child(api, _configmap(namespace, {"a": "1"}, owner), owner)
    assert foreign.value.conflict.controller == "no controller"
    assert kube.delete_owned(api, "v1", "ConfigMap", namespace, "cat-config", owner["metadata"]["uid"]) is False
    after = kube.get(api, "v1", "ConfigMap", namespace, "cat-config")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["data"] == {"mine": "yes"}


def test_an_apply_with_a_stale_uid_never_reaches_the_successor(cluster: Cluster, namespace: str) -> None:
    """Between the ownership check and the apply, the child was replaced by a foreign object of the same name."""
    api = _api(cluster)
    owner = _owner(cluster, namespace)
    old = kube.ensure_child(api, _configmap(namespace, {"a": "1"}, owner), owner)
    cluster.kubectl("delete", "configmap", "cat-config", "-n", namespace)
    cluster.kubectl("create", "configmap", "cat-config", "-n", namespace, "--from-literal=mine=yes")
    for force in (False, True):
        with pytest.raises(client.ApiException) as refused:
            kube.apply_owned(api, _configmap(namespace, {"a": "2"}, owner), old["metadata"]["uid"], force=force)
        assert refused.value.status == 422  # metadata.uid is immutable: another object
    # Gone altogether: the same apply does not create it either.
    cluster.kubectl("delete", "configmap", "cat-config", "-n", namespace)
    with pytest.raises(client.ApiException) as refused:
        kube.apply_owned(api, _configmap(namespace, {"a": "2"}, owner), old["metadata"]["uid"])
    assert refused.value.status == 409  # "uid mismatch: ... no existing object was found"
    assert kube.get(api, "v1", "ConfigMap", namespace, "cat-config") is None


def test_ttl_deletes_only_the_jobs_own_children(cluster: Cluster, namespace: str) -> None:
    api = _api(cluster)
    settings = OperatorSettings()
    job = _owner(cluster, namespace)
    state = cast("OperatorState", SimpleNamespace(api=api, settings=settings))
    cluster.kubectl("create", "configmap", "cat-config", "-n", namespace, "--from-literal=mine=yes")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "cat-workers", "namespace": namespace},
        "spec": {"clusterIP": "None", "selector": {"x": "y"}},
    }
    service["metadata"]["ownerReferences"] = _configmap(namespace, {}, job)["metadata"]["ownerReferences"]
    kube.create(api, service)  # the job's own
    execute(
        state, job, [], Plan(status=DreamBoothJobStatus(), actions=[Action(ActionKind.DELETE_CHILDREN, name="cat")])
    )
    assert kube.get(api, "v1", "ConfigMap", namespace, "cat-config")["data"] == {"mine": "yes"}
    gone = kube.get(api, "v1", "Service", namespace, "cat-workers")
    assert gone is None or gone["metadata"].get("deletionTimestamp")

"""The operator against a real control plane (no node agent: pods stay Pending or unschedulable).

Children, ownerReferences, idempotence, status through the subresource, events, suspend/resume, Kueue-style
admission, validation, deadline + TTL, and the metrics endpoint.


The jobs here switch the input check off (spec.runPolicy.preflight: false): with no node its pod could never run,
and these tests are about the attempt's children (the check is tested in tests/e2e/test_preflight.py and the
policy's unit tests)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.controlplane import Cluster
from tests.infra.operator import (
    OperatorProcess,
    apply,
    as_manifest,
    condition,
    event_reasons,
    get,
    items,
    running_operator,
    wait_for,
)
from tests.infra.wrappers import make_job

# No node has this label: pods never schedule, even when a node agent runs in the same session.
NOWHERE = {"dbo.test/no-such-node": "true"}
SELECTOR = "dreambooth.dev/job-name=cat"


@pytest.fixture
def op(cluster: Cluster, namespace: str, infra_log_dir: Path) -> Iterator[OperatorProcess]:
    """The real operator (subprocess) watching this test's namespace."""
    with running_operator(cluster, infra_log_dir, [namespace]) as operator:
        yield operator


def phase(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


def test_creates_owned_children_and_reports_unschedulable(
    cluster: Cluster, namespace: str, op: OperatorProcess
) -> None:
    apply(cluster, as_manifest(make_job("cat").no_preflight().pod_template(nodeSelector=NOWHERE).obj()), namespace)
    dbj = wait_for(
        "Unschedulable in the Running condition",
        lambda: get(cluster, "dreamboothjob", "cat", namespace),
        lambda j: (condition(j, "Running") or {}).get("reason") == "Unschedulable",
        op=op,
    )
    uid = dbj["metadata"]["uid"]
    assert phase(dbj) == "Pending"
    assert (condition(dbj, "Valid") or {}).get("status") == "True"
    assert dbj["status"]["observedGeneration"] == 1
    assert dbj["status"]["attempt"] == 0
    # The status went through the subresource: writing it never bumps the generation.
    assert dbj["metadata"]["generation"] == 1

    children = {
        "configmap": get(cluster, "configmap", "cat-config", namespace),
        "service": get(cluster, "service", "cat-workers", namespace),
        "job": get(cluster, "job.batch", "cat-a0", namespace),
    }
    for kind, child in children.items():
        assert child is not None, kind
        refs = child["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == [
            ("DreamBoothJob", "cat", uid, True)
        ], kind
    job = children["job"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["template"]["spec"]["subdomain"] == "cat-workers"
    assert json.loads(children["configmap"]["data"]["config.json"])["name"] == "cat"
    pods = items(cluster, "pods", namespace, SELECTOR)
    assert len(pods) == 1
    assert pods[0]["metadata"]["labels"]["dreambooth.dev/attempt"] == "0"

    reasons = wait_for("events", lambda: event_reasons(cluster, namespace, "cat"), lambda r: "Unschedulable" in r)
    assert "SpecValid" not in reasons  # what every new job starts with is no event (issue 20)

    # Idempotent: several reconciles later there is still exactly one of each child, unchanged. The idle job's
    # periodic check backs off, so events wake it: three annotations, each waited for.
    first = {j["metadata"]["uid"] for j in items(cluster, "jobs.batch", namespace, SELECTOR)}
    for poke in range(3):
        before = _reconciles(op.metrics_text())
        cluster.kubectl("annotate", "--overwrite", "dreamboothjob", "cat", "-n", namespace, f"dbo.test/poke={poke}")
        wait_for("a reconcile on the event", op.metrics_text, lambda text, b=before: _reconciles(text) > b, op=op)
    assert {j["metadata"]["uid"] for j in items(cluster, "jobs.batch", namespace, SELECTOR)} == first
    assert len(items(cluster, "services", namespace, SELECTOR)) == 1
    assert len(items(cluster, "configmaps", namespace, SELECTOR)) == 1

    # A deleted child is recreated (the current attempt's batch Job, same name).
    cluster.kubectl("delete", "job.batch", "cat-a0", "-n", namespace, "--wait=true")
    wait_for(
        "the batch Job to be recreated",
        lambda: get(cluster, "job.batch", "cat-a0", namespace),
        lambda j: j["metadata"]["uid"] not in first,
        op=op,
    )

    # Deleting the DreamBoothJob garbage-collects its children.
    cluster.kubectl("delete", "dreamboothjob", "cat", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(
        "children to be garbage-collected",
        lambda: items(cluster, "jobs.batch", namespace, SELECTOR) + items(cluster, "configmaps", namespace, SELECTOR),
        lambda left: left == [],
        op=op,
    )


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _reconciles(metrics: str) -> float:
    return _sample(metrics, "dreambooth_operator_reconcile_duration_seconds_count")


def test_suspend_and_resume_toggle_the_batch_job(cluster: Cluster, namespace: str, op: OperatorProcess) -> None:
    apply(cluster, as_manifest(make_job("cat").no_preflight().pod_template(nodeSelector=NOWHERE).obj()), namespace)
    wait_for("the batch Job", lambda: get(cluster, "job.batch", "cat-a0", namespace), lambda j: True, op=op)
    patch = {"spec": {"runPolicy": {"suspend": True}}}
    cluster.kubectl("patch", "dreamboothjob", "cat", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    wait_for(
        "the batch Job suspended",
        lambda: get(cluster, "job.batch", "cat-a0", namespace),
        lambda j: j["spec"].get("suspend") is True,
        op=op,
    )
    dbj = wait_for(
        "phase Suspended", lambda: get(cluster, "dreamboothjob", "cat", namespace), lambda j: phase(j) == "Suspended"
    )
    assert (condition(dbj, "Suspended") or {}).get("reason") == "SuspendedByUser"
    wait_for(
        "the Job controller to delete the pods",
        lambda: items(cluster, "pods", namespace, SELECTOR),
        lambda pods: pods == [],
        op=op,
    )
    patch = {"spec": {"runPolicy": {"suspend": False}}}
    cluster.kubectl("patch", "dreamboothjob", "cat", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    dbj = wait_for(
        "resumed",
        lambda: get(cluster, "dreamboothjob", "cat", namespace),
        lambda j: (condition(j, "Suspended") or {}).get("reason") == "Resumed" and phase(j) == "Pending",
        op=op,
    )
    assert get(cluster, "job.batch", "cat-a0", namespace)["spec"]["suspend"] is False  # type: ignore[index]
    wait_for("a new pod", lambda: items(cluster, "pods", namespace, SELECTOR), lambda pods: len(pods) == 1)
    assert {"SuspendedByUser", "Resumed"} <= event_reasons(cluster, namespace, "cat")


def test_kueue_labelled_job_is_created_suspended_and_queued_until_admitted(
    cluster: Cluster, namespace: str, op: OperatorProcess
) -> None:
    apply(
        cluster,
        as_manifest(make_job("cat").no_preflight().queue("gpu-queue").pod_template(nodeSelector=NOWHERE).obj()),
        namespace,
    )
    job = wait_for("the batch Job", lambda: get(cluster, "job.batch", "cat-a0", namespace), lambda j: True, op=op)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    dbj = wait_for(
        "phase Queued", lambda: get(cluster, "dreamboothjob", "cat", namespace), lambda j: phase(j) == "Queued"
    )
    assert (condition(dbj, "Queued") or {}).get("reason") == "WaitingForAdmission"
    # The operator never admits it itself: still suspended after more reconciles.
    before = _reconciles(op.metrics_text())
    wait_for("two more reconciles", op.metrics_text, lambda text: _reconciles(text) >= before + 2, op=op)
    assert get(cluster, "job.batch", "cat-a0", namespace)["spec"]["suspend"] is True  # type: ignore[index]
    # Admission, as Kueue does it: unsuspend the batch Job.
    cluster.kubectl("patch", "job.batch", "cat-a0", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    dbj = wait_for(
        "admitted",
        lambda: get(cluster, "dreamboothjob", "cat", namespace),
        lambda j: (condition(j, "Queued") or {}).get("reason") == "Admitted",
        op=op,
    )
    assert phase(dbj) == "Pending"


def test_invalid_spec_fails_with_every_error_and_creates_nothing(
    cluster: Cluster, namespace: str, op: OperatorProcess
) -> None:
    name = "n" * 60  # valid for the API server, too long for the pods' hostnames
    apply(cluster, as_manifest(make_job(name).no_preflight().obj()), namespace)
    dbj = wait_for(
        "Failed",
        lambda: get(cluster, "dreamboothjob", name, namespace),
        lambda j: phase(j) == "Failed",
        op=op,
    )
    failed = condition(dbj, "Failed") or {}
    assert failed.get("reason") == "InvalidSpec"
    assert "at most 54 fit" in failed.get("message", "")
    assert items(cluster, "jobs.batch", namespace) == []
    assert "InvalidSpec" in wait_for(
        "the InvalidSpec event", lambda: event_reasons(cluster, namespace, name), lambda r: "InvalidSpec" in r
    )


def test_deadline_fails_the_job_and_ttl_deletes_its_children_but_keeps_it(
    cluster: Cluster, namespace: str, op: OperatorProcess
) -> None:
    job = make_job("cat").no_preflight().pod_template(nodeSelector=NOWHERE).run_policy(activeDeadlineSeconds=3)
    apply(cluster, as_manifest(job.run_policy(ttlSecondsAfterFinished=4).obj()), namespace)
    dbj = wait_for(
        "DeadlineExceeded",
        lambda: get(cluster, "dreamboothjob", "cat", namespace),
        lambda j: phase(j) == "Failed",
        op=op,
    )
    assert (condition(dbj, "Failed") or {}).get("reason") == "DeadlineExceeded"
    assert dbj["status"].get("completionTime")
    wait_for(
        "TTL to delete the children",
        lambda: items(cluster, "jobs.batch", namespace, SELECTOR)
        + items(cluster, "services", namespace, SELECTOR)
        + items(cluster, "configmaps", namespace, SELECTOR),
        lambda left: left == [],
        op=op,
    )
    kept = get(cluster, "dreamboothjob", "cat", namespace)
    assert phase(kept) == "Failed"
    assert "ChildDeleted" in event_reasons(cluster, namespace, "cat")


def test_metrics_endpoint(cluster: Cluster, namespace: str, op: OperatorProcess) -> None:
    apply(cluster, as_manifest(make_job("cat").no_preflight().pod_template(nodeSelector=NOWHERE).obj()), namespace)
    text = wait_for(
        "a Pending job in the metrics",
        op.metrics_text,
        # The gauge is set during a reconcile, the reconcile count once it ends: wait for both.
        lambda t: 'dreambooth_operator_jobs{phase="Pending"} 1.0' in t and _reconciles(t) >= 1,
        op=op,
    )
    # An idle job (its pod cannot be placed) is never reconciled in a busy loop: its periodic check (2 s here)
    # backs off while nothing changes.
    before, start = _reconciles(text), time.monotonic()
    stale_before = _sample(text, "dreambooth_operator_stale_reads_total")
    wait_for("4 seconds", time.monotonic, lambda now: now - start >= 4.0)
    after = op.metrics_text()
    assert _reconciles(after) - before <= 8
    # An event wakes it at once, and the watched object has caught up with the operator's own writes: it is never
    # re-read from the API.
    cluster.kubectl("annotate", "dreamboothjob", "cat", "-n", namespace, "dbo.test/poke=1")
    woke = wait_for("a reconcile on the event", op.metrics_text, lambda t: _reconciles(t) > _reconciles(after), op=op)
    assert _sample(woke, "dreambooth_operator_stale_reads_total") == stale_before
    for name in (
        "dreambooth_operator_reconcile_errors_total",
        "dreambooth_operator_stale_reads_total",
        "dreambooth_operator_restarts_total",
        "dreambooth_operator_time_to_running_seconds",
        "dreambooth_operator_job_duration_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name


def test_objects_the_job_does_not_own_survive_untouched_and_block_it_with_child_conflict(
    cluster: Cluster, namespace: str, op: OperatorProcess
) -> None:
    # A ConfigMap with the name the job's would have, owned by nobody; a Service owned by another object.
    cluster.kubectl("create", "configmap", "cat-config", "-n", namespace, "--from-literal=config.json=theirs")
    owner = json.loads(cluster.kubectl("get", "configmap", "cat-config", "-n", namespace, "-o", "json").stdout)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "cat-workers",
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "cat-config",
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 80}]},
    }
    apply(cluster, service, namespace)
    before = {
        kind: get(cluster, kind, name, namespace)
        for kind, name in (("configmap", "cat-config"), ("service", "cat-workers"))
    }

    apply(cluster, as_manifest(make_job("cat").no_preflight().pod_template(nodeSelector=NOWHERE).obj()), namespace)
    dbj = wait_for(
        "ChildConflict",
        lambda: get(cluster, "dreamboothjob", "cat", namespace),
        lambda j: (condition(j, "ChildConflict") or {}).get("status") == "True",
        op=op,
    )
    message = (condition(dbj, "ChildConflict") or {}).get("message", "")
    assert "the ConfigMap cat-config already exists and is not controlled by this resource (no controller)" in message
    assert "the Service cat-workers already exists" in message
    assert "(controller: ConfigMap cat-config)" in message
    assert phase(dbj) == "Pending"
    events = [e for e in items(cluster, "events", namespace) if e.get("reason") == "ChildConflict"]
    assert [e["type"] for e in events] == ["Warning"]
    assert "cat-config" in events[0]["message"]
    # Several reconciles later: untouched (not even a label or an ownerReference added), and no attempt created.
    before_count = _reconciles(op.metrics_text())
    wait_for("three more reconciles", op.metrics_text, lambda text: _reconciles(text) >= before_count + 3, op=op)
    for (kind, name), was in zip(
        (("configmap", "cat-config"), ("service", "cat-workers")), before.values(), strict=True
    ):
        now = get(cluster, kind, name, namespace)
        assert now is not None
        assert was is not None
        assert now["metadata"]["resourceVersion"] == was["metadata"]["resourceVersion"], kind
    assert items(cluster, "jobs.batch", namespace) == []

    # Once they are gone, the job creates its own children and the conflict is resolved.
    cluster.kubectl("delete", "service", "cat-workers", "-n", namespace, "--wait=true")
    cluster.kubectl("delete", "configmap", "cat-config", "-n", namespace, "--wait=true")
    dbj = wait_for(
        "ConflictResolved",
        lambda: get(cluster, "dreamboothjob", "cat", namespace),
        lambda j: (condition(j, "ChildConflict") or {}).get("reason") == "ConflictResolved",
        op=op,
    )
    wait_for("the batch Job", lambda: get(cluster, "job.batch", "cat-a0", namespace), bool, op=op)
    for kind, name in (("configmap", "cat-config"), ("service", "cat-workers"), ("networkpolicy", "cat-network")):
        child = get(cluster, kind, name, namespace)
        assert child is not None, kind
        assert [r["uid"] for r in child["metadata"]["ownerReferences"]] == [dbj["metadata"]["uid"]], kind

"""End to end: suspending a running job stops its pod after a checkpoint; resuming continues from it.
A Kueue-labelled job stays Queued (no pod runs) until its batch Job is admitted (unsuspended)."""

from __future__ import annotations

import json
from typing import Any

from test_operator_training import credentials_secret, example, phase, upload_images

from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, condition, get, items, wait_for
from tests.infra.processes import NotReadyError
from tests.infra.s3 import S3Server

TIMEOUT = 420.0
SELECTOR = "dreambooth.dev/job-name=minimal,dreambooth.dev/component=trainer"
"""The training pods (not the input check's, which ran before them and stays until the job's TTL)."""


def _job(cluster: Cluster, s3: S3Server, namespace: str, steps: int) -> dict[str, Any]:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    job = example(s3, bucket)
    job["spec"]["training"].update({"maxSteps": steps, "checkpoint": {"intervalSteps": 5, "intervalSeconds": None}})
    job["spec"]["podTemplate"] = {"env": [{"name": "OMP_NUM_THREADS", "value": "1"}]}
    return job


def _set_suspend(cluster: Cluster, namespace: str, value: bool) -> None:
    patch = json.dumps({"spec": {"runPolicy": {"suspend": value}}})
    cluster.kubectl("patch", "dreamboothjob", "minimal", "-n", namespace, "--type=merge", "-p", patch)


def test_suspend_checkpoints_and_resume_continues(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess, node_agent: Any
) -> None:
    apply(cluster, _job(cluster, s3, namespace, 40), namespace)

    def fetch() -> dict[str, Any] | None:
        return get(cluster, "dreamboothjob", "minimal", namespace)

    wait_for(
        "a checkpoint",
        fetch,
        lambda j: phase(j) == "Running" and ((j["status"].get("lastCheckpoint") or {}).get("step") or 0) >= 5,
        TIMEOUT,
        op,
    )
    first_pod = next(p["metadata"]["name"] for p in items(cluster, "pods", namespace, SELECTOR))
    _set_suspend(cluster, namespace, True)
    wait_for("Suspended", fetch, lambda j: phase(j) == "Suspended", 60, op)
    wait_for("no pods", lambda: items(cluster, "pods", namespace, SELECTOR), lambda pods: pods == [], 120, op)
    suspended_log = node_agent.logs(namespace, first_pod)
    assert '"preempted"' in suspended_log or '"checkpoint_written"' in suspended_log, suspended_log[-2000:]
    _set_suspend(cluster, namespace, False)
    try:
        dbj = wait_for("Succeeded", fetch, lambda j: phase(j) in ("Succeeded", "Failed"), TIMEOUT, op)
    except NotReadyError as err:
        pods = items(cluster, "pods", namespace, SELECTOR)
        logs = {p["metadata"]["name"]: node_agent.logs(namespace, p["metadata"]["name"])[-2000:] for p in pods}
        raise AssertionError(f"{err}\n{json.dumps(logs)}") from err
    status = dbj["status"]
    assert phase(dbj) == "Succeeded", json.dumps(status)
    assert status["restarts"]["preemptions"] == 0  # a suspend is not a preemption
    assert (condition(dbj, "Suspended") or {}).get("reason") == "Resumed"
    second_pod = next(p["metadata"]["name"] for p in items(cluster, "pods", namespace, SELECTOR))
    resumed = [
        json.loads(line)
        for line in node_agent.logs(namespace, second_pod).splitlines()
        if line.startswith("{") and '"resumed"' in line
    ]
    assert resumed, node_agent.logs(namespace, second_pod)[-2000:]
    assert resumed[0]["step"] >= 5


def test_kueue_labelled_job_runs_only_after_admission(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess
) -> None:
    job = _job(cluster, s3, namespace, 10)
    job["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    apply(cluster, job, namespace)

    def fetch() -> dict[str, Any] | None:
        return get(cluster, "dreamboothjob", "minimal", namespace)

    wait_for("Queued", fetch, lambda j: phase(j) == "Queued", 60, op)
    assert items(cluster, "pods", namespace, SELECTOR) == []
    # Admission, as Kueue does it.
    cluster.kubectl(
        "patch", "job.batch", "minimal-a0", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    dbj = wait_for("Succeeded", fetch, lambda j: phase(j) in ("Succeeded", "Failed"), TIMEOUT, op)
    assert phase(dbj) == "Succeeded", json.dumps(dbj["status"])
    assert (condition(dbj, "Queued") or {}).get("reason") == "Admitted"

"""End to end: a two-node job (gloo on CPU) whose rank 1 is evicted restarts as a whole gang (attempt 1)
and resumes from the shared checkpoint."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from test_operator_training import (
    credentials_secret,
    example,
    held_seconds,
    parse_time,
    phase,
    upload_images,
    usage_by_pod,
)

from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, event_reasons, get, items, wait_for
from tests.infra.processes import NotReadyError
from tests.infra.s3 import S3Server

TIMEOUT = 480.0
ONE_THREAD = [{"name": "OMP_NUM_THREADS", "value": "1"}]


def _logs(cluster: Cluster, node_agent: Any, namespace: str) -> str:
    pods = items(cluster, "pods", namespace, "dreambooth.dev/job-name=minimal")
    return json.dumps({p["metadata"]["name"]: node_agent.logs(namespace, p["metadata"]["name"])[-2000:] for p in pods})


def test_multi_node_gang_restarts_as_a_new_attempt_after_an_eviction(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess, node_agent: Any
) -> None:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    job = example(s3, bucket)
    spec = job["spec"]
    spec["resources"] = {"nodes": 2, "gpusPerNode": 0}
    spec["output"]["checkpointUri"] = f"s3://{bucket}/checkpoints/minimal"
    spec["training"].update({"maxSteps": 30, "checkpoint": {"intervalSteps": 5, "intervalSeconds": None}})
    spec["podTemplate"] = {"env": ONE_THREAD}
    apply(cluster, job, namespace)

    def fetch() -> dict[str, Any] | None:
        return get(cluster, "dreamboothjob", "minimal", namespace)

    try:
        wait_for(
            "a checkpoint of attempt 0",
            fetch,
            lambda j: ((j["status"].get("lastCheckpoint") or {}).get("step") or 0) >= 5,
            TIMEOUT,
            op,
        )
    except NotReadyError as err:
        raise AssertionError(f"{err}\n{_logs(cluster, node_agent, namespace)}") from err
    rank1 = next(
        p["metadata"]["name"]
        for p in items(cluster, "pods", namespace, "dreambooth.dev/attempt=0")
        if p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "1"
    )
    evicted_at = datetime.now(UTC)
    with cluster.api_client() as api:
        client.CoreV1Api(api).create_namespaced_pod_eviction(
            rank1, namespace, client.V1Eviction(metadata=client.V1ObjectMeta(name=rank1, namespace=namespace))
        )
    restarted = wait_for("attempt 1", fetch, lambda j: j["status"].get("attempt") == 1, 120, op)
    assert restarted["status"]["restarts"]["preemptions"] == 1
    try:
        dbj = wait_for("Succeeded", fetch, lambda j: phase(j) in ("Succeeded", "Failed"), TIMEOUT, op)
    except NotReadyError as err:
        raise AssertionError(f"{err}\n{_logs(cluster, node_agent, namespace)}") from err
    status = dbj["status"]
    assert phase(dbj) == "Succeeded", json.dumps(status, indent=1)
    assert status["attempt"] == 1
    assert status["restarts"] == {"preemptions": 1, "failures": 0, "total": 1}
    # The old attempt's batch Job is gone; the new one ran both ranks.
    names = [j["metadata"]["name"] for j in items(cluster, "jobs.batch", namespace)]
    assert names == ["minimal-a1", "minimal-check"]  # and the input check that ran before attempt 0
    new_pods = items(cluster, "pods", namespace, "dreambooth.dev/attempt=1")
    assert sorted(p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] for p in new_pods) == ["0", "1"]
    rank0 = next(p for p in new_pods if p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "0")
    resumed = [
        json.loads(line)
        for line in node_agent.logs(namespace, rank0["metadata"]["name"]).splitlines()
        if line.startswith("{") and '"resumed"' in line
    ]
    assert resumed, _logs(cluster, node_agent, namespace)
    assert resumed[0]["step"] >= 5
    assert {"Preempted", "TrainingCompleted"} <= event_reasons(cluster, namespace, "minimal")
    # Usage: all four pods (two per attempt), the first attempt's deleted with its batch Job; no GPUs requested.
    runs = usage_by_pod(dbj)
    assert len(runs) == 4, runs
    assert status["usage"]["gpuSeconds"] == 0
    for pod in new_pods:
        assert runs.pop(pod["metadata"]["uid"]) == held_seconds(pod)
    # Attempt 0's pods were deleted with their batch Job: closed from their last state, at a stop after the eviction.
    first = [r for r in status["usage"]["pods"] if r["uid"] in runs]
    assert all(r["final"] for r in first), first
    assert all(parse_time(r["end"]) >= evicted_at.replace(microsecond=0) for r in first), (evicted_at, first)

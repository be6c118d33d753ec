"""End to end: activeDeadlineSeconds stops a running trainer and fails the job; the TTL then deletes the
batch Job, pods, Service and ConfigMap, and keeps the DreamBoothJob with its status."""

from __future__ import annotations

from typing import Any

from test_operator_training import credentials_secret, example, phase, upload_images

from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, condition, event_reasons, get, items, wait_for
from tests.infra.s3 import S3Server

SELECTOR = "dreambooth.dev/job-name=minimal"
TRAINERS = f"{SELECTOR},dreambooth.dev/component=trainer"
"""The attempt's batch Job and pods, not the input check `minimal-check` that ran before them."""


def test_deadline_then_ttl(cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess) -> None:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    job = example(s3, bucket)
    job["spec"]["training"]["maxSteps"] = 100000
    # The deadline of a running attempt: no input check first, whose seconds would count against the 20 s.
    job["spec"]["runPolicy"] = {"activeDeadlineSeconds": 20, "ttlSecondsAfterFinished": 5, "preflight": False}
    apply(cluster, job, namespace)

    def fetch() -> dict[str, Any] | None:
        return get(cluster, "dreamboothjob", "minimal", namespace)

    wait_for("a running pod", lambda: items(cluster, "pods", namespace, SELECTOR), lambda p: len(p) == 1, 120, op)
    dbj = wait_for("Failed", fetch, lambda j: phase(j) == "Failed", 120, op)
    assert (condition(dbj, "Failed") or {}).get("reason") == "DeadlineExceeded"
    wait_for(
        "TTL to delete every child",
        lambda: items(cluster, "jobs.batch", namespace, SELECTOR)
        + items(cluster, "pods", namespace, SELECTOR)
        + items(cluster, "services", namespace, SELECTOR)
        + items(cluster, "configmaps", namespace, SELECTOR),
        lambda left: left == [],
        120,
        op,
    )
    kept = fetch()
    assert phase(kept) == "Failed"
    assert {"DeadlineExceeded", "ChildDeleted"} <= event_reasons(cluster, namespace, "minimal")


def test_gpu_seconds_limit_stops_the_job_at_its_budget(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess
) -> None:
    """The node agent's fake GPU: one per pod. The limit is reached by the running pod; the operator wakes when the
    GPUs held would spend the rest, so it stops the attempt close to the limit, not at its next periodic reconcile."""
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    job = example(s3, bucket)
    job["spec"]["training"]["maxSteps"] = 100000
    job["spec"]["resources"] = {"gpusPerNode": 1}
    job["spec"]["runPolicy"] = {"gpuSecondsLimit": 15}
    apply(cluster, job, namespace)

    def fetch() -> dict[str, Any] | None:
        return get(cluster, "dreamboothjob", "minimal", namespace)

    dbj = wait_for("Failed", fetch, lambda j: phase(j) == "Failed", 180, op)
    failed = condition(dbj, "Failed") or {}
    assert failed.get("reason") == "GpuSecondsLimitExceeded", dbj["status"]
    used = dbj["status"]["usage"]["gpuSeconds"]
    assert 15 <= used <= 15 + 8, dbj["status"]["usage"]  # not a whole 12 s reconcile interval late
    assert f"used {used} GPU-seconds" in failed.get("message", "")
    wait_for(
        "the attempt to be deleted",
        lambda: items(cluster, "jobs.batch", namespace, TRAINERS),
        lambda j: j == [],
        120,
        op,
    )
    assert "GpuSecondsLimitExceeded" in event_reasons(cluster, namespace, "minimal")

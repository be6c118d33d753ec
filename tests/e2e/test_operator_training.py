"""End to end: the operator runs the real trainer (`dreambooth-train`) in pods that the node agent executes.

examples/minimal-job.yaml as it is (placeholders replaced), an operator restart in the middle, invalid
input, and preemption through the Eviction API with resume from the last checkpoint.
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from PIL import Image

from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, condition, event_reasons, get, items, wait_for
from tests.infra.paths import ROOT
from tests.infra.processes import NotReadyError
from tests.infra.s3 import S3Server

MINIMAL = ROOT / "examples" / "minimal-job.yaml"
TRAIN_TIMEOUT = 420.0
TRAINER = "dreambooth.dev/component=trainer"
"""The training pods and batch Jobs (not the input check `<job>-check` that runs before them)."""


def upload_images(s3: S3Server, bucket: str, prefix: str, count: int = 4) -> None:
    """A few distinct synthetic photos (PIL), so no dataset is downloaded."""
    s3c = s3.client()
    for i in range(count):
        img = Image.new("RGB", (96, 96), (40 * i, 200 - 30 * i, 90))
        for x in range(20 + 5 * i, 60 + 5 * i):
            for y in range(30, 70):
                img.putpixel((x, y), (250, 250 - 40 * i, 10))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        s3c.put_object(Bucket=bucket, Key=f"{prefix}img{i}.png", Body=buf.getvalue())


def credentials_secret(cluster: Cluster, s3: S3Server, namespace: str) -> None:
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "s3-credentials",
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    )


def example(s3: S3Server, bucket: str, path: Path = MINIMAL) -> dict[str, Any]:
    """The example exactly as committed, with the documented placeholders replaced (examples/README.md)."""
    text = path.read_text().replace("dreambooth-examples", bucket).replace("http://s3.example:8333", s3.endpoint)
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def phase(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


def keys(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def held_seconds(pod: dict[str, Any]) -> float:
    """How long a stopped pod held its node, read from the API: PodScheduled to its trainer's finishedAt."""
    scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    finished = pod["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
    return (parse_time(finished) - parse_time(scheduled["lastTransitionTime"])).total_seconds()


def usage_by_pod(dbj: dict[str, Any]) -> dict[str, float]:
    """status.usage's ledger (pod uid -> seconds held), checked to add up to podSeconds and gpuSeconds."""
    usage = dbj["status"]["usage"]
    runs = {r["uid"]: (parse_time(r["end"]) - parse_time(r["start"])).total_seconds() for r in usage["pods"]}
    assert usage["podSeconds"] == round(sum(runs.values())) + usage.get("earlierPodSeconds", 0), usage
    assert usage["gpuSeconds"] == usage["podSeconds"] * usage["gpusPerPod"], usage
    return runs


def test_minimal_example_succeeds_across_an_operator_restart(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess
) -> None:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    job = example(s3, bucket)
    name = job["metadata"]["name"]
    apply(cluster, job, namespace)

    seen: set[str] = set()

    def fetch() -> dict[str, Any] | None:
        obj = get(cluster, "dreamboothjob", name, namespace)
        if phase(obj):
            seen.add(str(phase(obj)))
        return obj

    wait_for("pods running", fetch, lambda j: phase(j) in ("Initializing", "Running", "Succeeded"), 180, op)
    # The operator restarts while the job runs: it picks the job up again without a second batch Job.
    op.restart()
    dbj = wait_for("Succeeded", fetch, lambda j: phase(j) in ("Succeeded", "Failed"), TRAIN_TIMEOUT, op)
    assert phase(dbj) == "Succeeded", json.dumps(dbj["status"], indent=1)
    status = dbj["status"]
    assert status["outputs"]["modelUri"].startswith(f"s3://{bucket}/models/minimal")
    assert status["progressText"] == "20/20"
    # Restarts as the Job controller counted them (a trainer exit 11 would be retried and counted here).
    batch = get(cluster, "job.batch", f"{name}-a0", namespace) or {}
    failed = (batch.get("status") or {}).get("failed", 0)
    assert status["restarts"] == {"preemptions": 0, "failures": failed, "total": failed}
    assert status["attempt"] == 0
    assert status["completionTime"] >= status["startTime"]
    assert (condition(dbj, "Succeeded") or {}).get("reason") == "TrainingCompleted"
    assert "Initializing" in seen or "Running" in seen
    # One training Job, and the input check that ran before it (kept until the job's TTL, like the attempt).
    assert [j["metadata"]["name"] for j in items(cluster, "jobs.batch", namespace)] == [f"{name}-a0", f"{name}-check"]
    assert any(k.startswith("models/minimal/model/") for k in keys(s3, bucket, "models/minimal/"))
    assert "TrainingCompleted" in event_reasons(cluster, namespace, name)
    # GPU time: the pod that trained, from its binding to its exit, counted once across the operator restart.
    pods = items(cluster, "pods", namespace, f"dreambooth.dev/job-name={name},{TRAINER}")
    done = next(p for p in pods if p["status"].get("phase") == "Succeeded")
    runs = usage_by_pod(dbj)
    assert len(runs) == 1 + failed, runs
    assert runs[done["metadata"]["uid"]] == held_seconds(done)
    assert status["usage"]["gpusPerPod"] == 1
    metrics = op.metrics_text()
    assert 'dreambooth_operator_job_gpu_seconds_count{phase="Succeeded"} 1.0' in metrics
    assert 'dreambooth_operator_jobs{phase="Succeeded"} 1.0' in metrics
    assert 'dreambooth_operator_job_duration_seconds_count{phase="Succeeded"} 1.0' in metrics


def test_invalid_input_fails_at_once_with_the_trainers_message(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess
) -> None:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/", count=2)
    s3.client().put_object(Bucket=bucket, Key="subjects/dog/cat3.jpg", Body=b"not an image at all")
    credentials_secret(cluster, s3, namespace)
    job = example(s3, bucket)
    # The trainer's own check and the podFailurePolicy's FailJob, without the CPU-only input check that would catch
    # the image first (that path: test_preflight.py).
    job["spec"]["runPolicy"] = {"preflight": False}
    apply(cluster, job, namespace)
    dbj = wait_for(
        "Failed", lambda: get(cluster, "dreamboothjob", "minimal", namespace), lambda j: phase(j) == "Failed", 300, op
    )
    failed = condition(dbj, "Failed") or {}
    assert failed.get("reason") == "InvalidInput", failed
    assert "cat3.jpg" in failed.get("message", "")
    # FailJob: the Job controller fails the batch Job at once, without a retry.
    batch = wait_for(
        "the batch Job to fail",
        lambda: get(cluster, "job.batch", "minimal-a0", namespace),
        lambda j: (condition(j, "Failed") or {}).get("reason") == "PodFailurePolicy",
        60,
        op,
    )
    assert batch["status"].get("failed") == 1
    assert dbj["status"]["restarts"]["total"] == 0
    assert "InvalidInput" in event_reasons(cluster, namespace, "minimal")


SELECTOR = f"dreambooth.dev/job-name=minimal,{TRAINER}"
ONE_THREAD = [{"name": "OMP_NUM_THREADS", "value": "1"}]


def staged_example(
    cluster: Cluster, s3: S3Server, namespace: str, steps: int | None = None
) -> tuple[str, dict[str, Any]]:
    """A bucket with the subject's photos, the credentials Secret, and the minimal example pointing at them; with
    `steps`, that many steps with a checkpoint every 5. One torch thread per trainer: the machine's cores are few."""
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    job = example(s3, bucket)
    if steps is not None:
        job["spec"]["training"].update({"maxSteps": steps, "checkpoint": {"intervalSteps": 5, "intervalSeconds": None}})
    job["spec"]["podTemplate"] = {"env": list(ONE_THREAD)}
    return bucket, job


def evict_after_a_checkpoint(cluster: Cluster, namespace: str, op: OperatorProcess, name: str = "minimal") -> str:
    """Wait until the job has a checkpoint (step >= 5) while Running, evict its one running pod, return its name."""
    wait_for(
        "a checkpoint while training",
        lambda: get(cluster, "dreamboothjob", name, namespace),
        lambda j: phase(j) == "Running" and ((j["status"].get("lastCheckpoint") or {}).get("step") or 0) >= 5,
        TRAIN_TIMEOUT,
        op,
    )
    selector = f"dreambooth.dev/job-name={name},{TRAINER}"
    running = [p for p in items(cluster, "pods", namespace, selector) if p["status"].get("phase") == "Running"]
    assert len(running) == 1
    evicted: str = running[0]["metadata"]["name"]
    with cluster.api_client() as api:
        client.CoreV1Api(api).create_namespaced_pod_eviction(
            evicted, namespace, client.V1Eviction(metadata=client.V1ObjectMeta(name=evicted, namespace=namespace))
        )
    return evicted


def wait_until_finished(
    cluster: Cluster, namespace: str, op: OperatorProcess, node_agent: Any, name: str = "minimal"
) -> dict[str, Any]:
    """The job once Succeeded or Failed; on a timeout, the error carries the tail of every pod's log."""
    try:
        dbj: dict[str, Any] = wait_for(
            "Succeeded",
            lambda: get(cluster, "dreamboothjob", name, namespace),
            lambda j: phase(j) in ("Succeeded", "Failed"),
            TRAIN_TIMEOUT,
            op,
        )
    except NotReadyError as err:
        logs = {
            p["metadata"]["name"]: node_agent.logs(namespace, p["metadata"]["name"])[-3000:]
            for p in items(cluster, "pods", namespace, f"dreambooth.dev/job-name={name}")
        }
        raise AssertionError(f"{err}\ntrainer logs: {json.dumps(logs, indent=1)}") from err
    return dbj


def wait_until_succeeded_after_one_preemption(
    cluster: Cluster, namespace: str, op: OperatorProcess, node_agent: Any, steps: int
) -> dict[str, Any]:
    """The job once finished, checked to have succeeded with all `steps` after one preemption and no failure."""
    dbj = wait_until_finished(cluster, namespace, op, node_agent)
    status = dbj["status"]
    assert phase(dbj) == "Succeeded", json.dumps(status, indent=1)
    assert status["restarts"]["preemptions"] == 1
    assert status["restarts"]["failures"] == 0
    assert status["progressText"] == f"{steps}/{steps}"
    return dbj


def test_eviction_is_a_preemption_and_training_resumes_from_the_checkpoint(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess, node_agent: Any
) -> None:
    _, job = staged_example(cluster, s3, namespace, steps=40)
    apply(cluster, job, namespace)

    evicted = evict_after_a_checkpoint(cluster, namespace, op)
    dbj = wait_until_succeeded_after_one_preemption(cluster, namespace, op, node_agent, steps=40)
    # The evicted pod checkpointed on its way out, so its replacement redid no step.
    assert dbj["status"]["progress"]["stepsRedone"] == 0, dbj["status"]["progress"]
    # GPU time counts both pods: the evicted one until it stopped (or was last seen), and its replacement.
    runs = usage_by_pod(dbj)
    assert len(runs) == 2, runs
    done = next(p for p in items(cluster, "pods", namespace, SELECTOR) if p["status"].get("phase") == "Succeeded")
    assert runs.pop(done["metadata"]["uid"]) == held_seconds(done)
    (evicted_seconds,) = runs.values()
    assert evicted_seconds >= 1  # it trained to a checkpoint (step 5 or later) before the eviction
    assert all(r["final"] for r in dbj["status"]["usage"]["pods"]), dbj["status"]["usage"]  # both closed at a stop
    batch = get(cluster, "job.batch", "minimal-a0", namespace) or {}
    assert (batch.get("status") or {}).get("failed", 0) == 0  # the ignored disruption used no backoffLimit
    reasons = event_reasons(cluster, namespace, "minimal")
    assert {"Preempted", "Resumed", "TrainingCompleted"} <= reasons, reasons
    # The replacement pod resumed from a checkpoint instead of starting over.
    replacement = next(
        p["metadata"]["name"] for p in items(cluster, "pods", namespace, SELECTOR) if p["metadata"]["name"] != evicted
    )
    resumed = [
        json.loads(line)
        for line in node_agent.logs(namespace, replacement).splitlines()
        if line.startswith("{") and '"resumed"' in line
    ]
    assert resumed, node_agent.logs(namespace, replacement)[-2000:]
    assert resumed[0]["step"] >= 5

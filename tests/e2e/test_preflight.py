"""End to end: the CPU-only input check (`<job>-check`) before the GPU Job, with the real operator, trainer image
entry point and S3 server, in a namespace that enforces Pod Security "restricted".

Bad input (an empty prefix, a missing bucket, a corrupt image) fails the job with reason InvalidInput and a message
naming the cause, before any GPU Job exists: status.usage shows 0 GPU-seconds. Good input passes the check, and the
job trains and succeeds as before.
"""

from __future__ import annotations

import json
from typing import Any

from tests.e2e.test_operator_training import (
    TRAIN_TIMEOUT,
    credentials_secret,
    example,
    phase,
    upload_images,
    usage_by_pod,
)
from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, condition, get, items, wait_for
from tests.infra.s3 import S3Server

CHECK_TIMEOUT = 240.0
ONE_THREAD = [{"name": "OMP_NUM_THREADS", "value": "1"}]


def job_named(s3: S3Server, bucket: str, name: str, images: str) -> dict[str, Any]:
    """The minimal example as `name`, reading its photos from `images`, with a GPU per pod (the fake GPU nodes')."""
    job = example(s3, bucket)
    job["metadata"]["name"] = name
    spec = job["spec"]
    spec["instanceImages"]["uri"] = images
    spec["output"]["uri"] = f"s3://{bucket}/models/{name}/"
    spec["resources"] = {"gpusPerNode": 1}
    spec["podTemplate"] = {"env": list(ONE_THREAD)}
    return job


def events_of(cluster: Cluster, namespace: str, name: str) -> list[tuple[str, str, str]]:
    return [
        (str(e.get("type")), str(e.get("reason")), str(e.get("message")))
        for e in items(cluster, "events", namespace)
        if (e.get("involvedObject") or {}).get("name") == name
    ]


def test_bad_input_fails_on_the_cpu_check_with_the_cause_and_no_gpu_time(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess
) -> None:
    bucket = s3.make_bucket()
    missing = f"no-such-bucket-{bucket[-8:]}"
    upload_images(s3, bucket, "subjects/dog/", count=2)
    upload_images(s3, bucket, "subjects/cat/", count=2)
    s3.client().put_object(Bucket=bucket, Key="subjects/cat/cat3.jpg", Body=b"not an image at all")
    credentials_secret(cluster, s3, namespace)
    cases = {
        "empty": (
            f"s3://{bucket}/subjects/nobody/",
            f"no instance images (jpg, jpeg, png, webp) under instanceImages.uri s3://{bucket}/subjects/nobody/",
        ),
        "nobucket": (f"s3://{missing}/subjects/dog/", f"bucket {missing} does not exist"),
        "corrupt": (
            f"s3://{bucket}/subjects/cat/",
            f"instance image s3://{bucket}/subjects/cat/cat3.jpg is not a decodable image: ",
        ),
    }
    for name, (images, _) in cases.items():
        apply(cluster, job_named(s3, bucket, name, images), namespace)

    for name, (_, says) in cases.items():
        dbj = wait_for(
            f"{name} to fail",
            lambda name=name: get(cluster, "dreamboothjob", name, namespace),
            lambda j: phase(j) in ("Failed", "Succeeded", "Running", "Initializing"),
            CHECK_TIMEOUT,
            op,
        )
        status = dbj["status"]
        assert phase(dbj) == "Failed", json.dumps(status, indent=1)
        failed = condition(dbj, "Failed") or {}
        assert failed.get("reason") == "InvalidInput", failed
        assert failed.get("message", "").startswith(says), (name, failed)
        assert status["message"] == failed["message"]
        assert (condition(dbj, "InputChecked") or {}).get("reason") == "InvalidInput"
        # No GPU Job was ever made: only the check ran, and status.usage shows it.
        assert status["usage"]["gpuSeconds"] == 0, status["usage"]
        assert status["usage"]["podSeconds"] == 0, status["usage"]
        assert status["usage"].get("pods", []) == []
        assert status["attempt"] == 0
        events = events_of(cluster, namespace, name)
        warnings = [e for e in events if e[1] == "InvalidInput"]
        assert len(warnings) == 1, events
        assert warnings[0][0] == "Warning"
        assert says in warnings[0][2]
    jobs = sorted(j["metadata"]["name"] for j in items(cluster, "jobs.batch", namespace))
    assert jobs == sorted(f"{name}-check" for name in cases)
    pods = items(cluster, "pods", namespace)
    assert pods, "the check pods are kept (their logs explain the failure)"
    assert {p["metadata"]["labels"]["dreambooth.dev/component"] for p in pods} == {"preflight"}
    for pod in pods:  # no GPU asked for, admitted as "restricted", exit 10 at the first try
        container = pod["spec"]["containers"][0]
        assert not any("gpu" in key for key in (container.get("resources") or {}).get("requests", {})), container
        assert container["args"] == ["--preflight"]
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 10
    assert len(pods) == len(cases)
    assert s3.secret_key not in json.dumps([get(cluster, "dreamboothjob", n, namespace) for n in cases])


def test_good_input_passes_the_check_and_the_job_trains(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess
) -> None:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    job = job_named(s3, bucket, "good", f"s3://{bucket}/subjects/dog/")
    job["spec"]["training"]["maxSteps"] = 6
    apply(cluster, job, namespace)

    dbj = wait_for(
        "Succeeded",
        lambda: get(cluster, "dreamboothjob", "good", namespace),
        lambda j: phase(j) in ("Succeeded", "Failed"),
        TRAIN_TIMEOUT,
        op,
    )
    status = dbj["status"]
    assert phase(dbj) == "Succeeded", json.dumps(status, indent=1)
    checked = condition(dbj, "InputChecked") or {}
    assert (checked.get("status"), checked.get("reason")) == ("True", "InputValid"), checked
    assert checked["message"].startswith(f"4 instance image(s) in s3://{bucket}/subjects/dog/ decode"), checked
    check = get(cluster, "job.batch", "good-check", namespace) or {}
    assert (condition(check, "Complete") or {}).get("status") == "True", check.get("status")
    # The check ran first: the GPU pod was created after the check finished, and only it is in the usage.
    trainer = items(cluster, "pods", namespace, "dreambooth.dev/job-name=good,dreambooth.dev/component=trainer")
    assert len(trainer) == 1
    assert trainer[0]["metadata"]["creationTimestamp"] >= check["status"]["completionTime"]
    runs = usage_by_pod(dbj)
    assert list(runs) == [trainer[0]["metadata"]["uid"]], runs
    reasons = {e[1] for e in events_of(cluster, namespace, "good")}
    assert {"CheckingInput", "InputValid", "TrainingCompleted"} <= reasons, reasons

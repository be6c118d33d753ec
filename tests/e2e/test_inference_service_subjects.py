"""End to end: an InferenceService's `spec.subjects` selector serves every matching LoRA job as a subject, and a job
that succeeds after the service is Ready becomes servable with no new pods.

The service serves the tiny base model (uploaded by the test) on the node agent. The operator publishes the
Succeeded jobs its selector matches in the ConfigMap `<service>-subjects`, which the pod mounts; the node agent
refreshes the mounted file when the ConfigMap changes (as the kubelet does) and the server re-reads it. So the
second job shows up in `GET /v1/models` and `dreambooth generate --subject` draws it, while the service's pods
(uids, restart counts) and its Deployment's generation stay as they were.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from tests.e2e.test_inference_service import (
    ONE_THREAD,
    PROMPT,
    TRAIN_TIMEOUT,
    api,
    base_url,
    cli_generate,
    running_pods,
    settled,
    storage,
    wait_ready,
)
from tests.e2e.test_operator_training import phase, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.inference import inference_service
from tests.infra.operator import OperatorProcess, apply, get, items, wait_for
from tests.infra.processes import wait_until
from tests.infra.s3 import S3Server

LABELS = {"team": "avatars"}
SERVICE = "avatars"
SAMPLE = ["-p", PROMPT, "--seed", "7", "--steps", "2"]


def lora_job(name: str, seed: int, bucket: str, store: dict[str, Any]) -> dict[str, Any]:
    """A tiny LoRA job labelled for the service's selector (no input check: the e2e of that is test_preflight.py); its
    training seed makes its adapter its own (the same seed and data give the same weights)."""
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": name, "labels": LABELS},
        "spec": {
            "baseModel": {"tiny": True},
            "instanceImages": {"uri": f"s3://{bucket}/subjects/dog/", "prompt": PROMPT},
            "training": {"method": "lora", "maxSteps": 4, "resolution": 32, "seed": seed},
            "output": {"uri": f"s3://{bucket}/models/{name}/", "formats": ["lora"]},
            "storage": store,
            "resources": {"gpusPerNode": 0},
            "podTemplate": {"env": ONE_THREAD},
            "runPolicy": {"preflight": False},
        },
    }


def upload_tiny_base(s3: S3Server, bucket: str, tmp_path: Path) -> str:
    """The tiny model the jobs train from (`baseModel: {tiny: true}`), as a diffusers folder in the bucket."""
    from dreambooth_trainer.tiny import build_tiny_pipeline  # torch: only this test needs it

    folder = build_tiny_pipeline(tmp_path / "models")
    client = s3.client()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"base/tiny/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/base/tiny"


def succeeded(cluster: Cluster, namespace: str, op: OperatorProcess, name: str) -> None:
    job = wait_for(
        f"the job {name} to finish",
        lambda: get(cluster, "dreamboothjob", name, namespace),
        lambda j: phase(j) in ("Succeeded", "Failed"),
        TRAIN_TIMEOUT,
        op,
    )
    assert phase(job) == "Succeeded", json.dumps(job["status"], indent=1)


def serving(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """What must not change when a subject is added: the pods (uid -> restarts) and the Deployment's generation."""
    pods = items(cluster, "pods", namespace, f"dreambooth.dev/inference-service={SERVICE}")
    (deployment,) = items(cluster, "deployments", namespace, f"dreambooth.dev/inference-service={SERVICE}")
    return {
        "pods": {p["metadata"]["uid"]: [s["restartCount"] for s in p["status"]["containerStatuses"]] for p in pods},
        "generation": deployment["metadata"]["generation"],
    }


def draw(cluster: Cluster, namespace: str, url: str, subject: str, out: Path) -> bytes:
    """`dreambooth generate --subject`: the PNG it wrote."""
    result = cli_generate(cluster, namespace, SERVICE, *SAMPLE, "--subject", subject, "-o", str(out), "--url", url)
    assert result.returncode == 0, result.stderr
    return (out / f"{subject}-7.png").read_bytes()


def test_new_subject_no_rollout(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess, node_agent: Any, tmp_path: Path
) -> None:
    """A job that succeeds after the service is Ready becomes a subject with no new pods. (A short name: the
    namespace, and so the chart's object names in it, derive from it.)"""
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    store = storage(cluster, s3, namespace)
    model = {"modelUri": upload_tiny_base(s3, bucket, tmp_path)}
    apply(cluster, lora_job("first", 1, bucket, store), namespace)
    isvc = inference_service(
        SERVICE, model, storage=store, podTemplate={"env": ONE_THREAD}, subjects={"matchLabels": LABELS}
    )
    apply(cluster, isvc, namespace)

    succeeded(cluster, namespace, op, "first")
    served = wait_for(
        "the service Ready with one subject",
        lambda: get(cluster, "inferenceservice", SERVICE, namespace),
        lambda s: phase(s) in ("Ready", "Failed") and s["status"].get("subjects") == 1,
        300,
        op,
    )
    assert phase(served) == "Ready", json.dumps(served["status"], indent=1)
    (pod,) = running_pods(cluster, namespace, SERVICE)
    url = base_url(pod)
    wait_ready(url)
    client = api(url)
    wait_until(lambda: [m.id for m in client.models.list()] == ["base", "first"], timeout=60, what="first listed")
    first = draw(cluster, namespace, url, "first", tmp_path / "first")
    base = client.images.generate(prompt=PROMPT, extra_body={"seed": 7, "num_inference_steps": 2})
    assert base64.b64decode((base.data or [])[0].b64_json or "") != first  # the subject's weights were applied
    before = serving(cluster, namespace)

    # A second matching job, after the service is Ready: published to the running server, no rollout.
    apply(cluster, lora_job("second", 2, bucket, store), namespace)
    succeeded(cluster, namespace, op, "second")
    wait_for(
        "two subjects",
        lambda: get(cluster, "inferenceservice", SERVICE, namespace),
        lambda s: s["status"].get("subjects") == 2,
        60,
        op,
    )
    wait_until(
        lambda: [m.id for m in client.models.list()] == ["base", "first", "second"],
        timeout=60,
        what="second listed by the running server",
    )
    second = draw(cluster, namespace, url, "second", tmp_path / "second")
    assert second not in (first, base64.b64decode((base.data or [])[0].b64_json or ""))
    assert serving(cluster, namespace) == before
    assert phase(settled(cluster, namespace, op, SERVICE)) == "Ready"

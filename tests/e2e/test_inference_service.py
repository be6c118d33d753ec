"""End to end: InferenceServices (fromJob with a token, then a single-file modelUri without) run the real
`dreambooth-serve`; a service whose model cannot be loaded is Failed with the server's error.

The operator trains a tiny job (the real trainer, in pods the node agent runs), then deploys the sampling server
from `model.fromJob`; the node agent runs the Deployment's pod, the readiness probe (/healthz) passes once the
model is loaded, and the test calls POST /generate on the pod IP (the Service has no ClusterIP routing here).
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from typing import Any

from operator_harness import OperatorProcess, apply, condition, get, items, wait_for
from PIL import Image

from tests.e2e.test_operator_training import credentials_secret, phase, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.s3 import S3Server

TRAIN_TIMEOUT = 420.0
SERVE_TIMEOUT = 300.0
TOKEN = "s3cret-token"
# One torch thread per process: the test machine's few cores are shared.
ONE_THREAD = [{"name": "OMP_NUM_THREADS", "value": "1"}]


def storage(cluster: Cluster, s3: S3Server, namespace: str) -> dict[str, Any]:
    credentials_secret(cluster, s3, namespace)
    return {"endpoint": s3.endpoint, "addressingStyle": "path", "credentialsSecret": {"name": "s3-credentials"}}


def post_generate(url: str, body: dict[str, Any], token: str | None) -> tuple[int, str, bytes]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - a local test URL
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def test_inference_service_from_a_succeeded_job_serves_pngs_behind_a_token(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess, node_agent: Any
) -> None:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    store = storage(cluster, s3, namespace)
    job = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": "dog"},
        "spec": {
            "baseModel": {"tiny": True},
            "instanceImages": {"uri": f"s3://{bucket}/subjects/dog/", "prompt": "a photo of sks dog"},
            "training": {"maxSteps": 4, "resolution": 64},
            "output": {"uri": f"s3://{bucket}/models/dog/", "formats": ["diffusers", "safetensors", "lora"]},
            "storage": store,
            "resources": {"gpusPerNode": 0},
            "podTemplate": {"env": ONE_THREAD},
        },
    }
    cluster.kubectl("create", "secret", "generic", "serve-token", "-n", namespace, f"--from-literal=token={TOKEN}")
    isvc = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "dog-server"},
        "spec": {
            "model": {"fromJob": "dog"},
            "resources": {"gpus": 0},
            "storage": store,
            "auth": {"bearerTokenSecret": {"name": "serve-token"}},
            "podTemplate": {"env": ONE_THREAD},
        },
    }
    # Applied together: the InferenceService waits for its job.
    apply(cluster, job, namespace)
    apply(cluster, isvc, namespace)
    waiting = wait_for(
        "the service to wait for its job",
        lambda: get(cluster, "inferenceservice", "dog-server", namespace),
        lambda s: phase(s) is not None,
        60,
        op,
    )
    if phase(waiting) != "Ready":
        assert not items(cluster, "deployments", namespace), "no Deployment before the job's model exists"

    dbj = wait_for(
        "the job to finish",
        lambda: get(cluster, "dreamboothjob", "dog", namespace),
        lambda j: phase(j) in ("Succeeded", "Failed"),
        TRAIN_TIMEOUT,
        op,
    )
    assert phase(dbj) == "Succeeded", json.dumps(dbj["status"], indent=1)
    model_uri = dbj["status"]["outputs"]["modelUri"]

    def fetch() -> dict[str, Any] | None:
        return get(cluster, "inferenceservice", "dog-server", namespace)

    try:
        served = wait_for("the service Ready", fetch, lambda s: phase(s) in ("Ready", "Failed"), SERVE_TIMEOUT, op)
    except Exception as err:
        pods = items(cluster, "pods", namespace, "dreambooth.dev/inference-service=dog-server")
        logs = {p["metadata"]["name"]: node_agent.logs(namespace, p["metadata"]["name"])[-3000:] for p in pods}
        raise AssertionError(f"{err}\nserver logs: {json.dumps(logs, indent=1)}") from err
    status = served["status"]
    assert phase(served) == "Ready", json.dumps(status, indent=1)
    assert status["readyReplicas"] == 1
    assert status["modelUri"] == model_uri
    assert status["url"] == f"http://dog-server.{namespace}.svc:80"
    assert (condition(served, "Ready") or {}).get("status") == "True"

    pods = [
        p
        for p in items(cluster, "pods", namespace, "dreambooth.dev/inference-service=dog-server")
        if p["status"].get("phase") == "Running"
    ]
    assert len(pods) == 1
    container = pods[0]["spec"]["containers"][0]
    assert container["command"] == ["dreambooth-serve"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    url = f"http://{pods[0]['status']['podIP']}:{port}/generate"
    body = {"prompt": "a photo of sks dog", "steps": 2, "width": 64, "height": 64, "seed": 7}

    code, _, _ = post_generate(url, body, token=None)
    assert code == 401
    code, _, _ = post_generate(url, body, token="wrong")
    assert code == 401
    code, content_type, png = post_generate(url, body, token=TOKEN)
    assert code == 200, png[:500]
    assert content_type == "image/png"
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG"
    assert image.size == (64, 64)

    # The same model as one single-file checkpoint (its config from baseModel), without auth: a request without a
    # token is served.
    single_file = f"s3://{bucket}/models/dog/model.safetensors"
    direct = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "direct"},
        "spec": {
            "model": {"modelUri": single_file, "baseModel": {"tiny": True}},
            "resources": {"gpus": 0},
            "storage": store,
            "podTemplate": {"env": ONE_THREAD},
        },
    }
    apply(cluster, direct, namespace)
    served = wait_for(
        "the modelUri service Ready",
        lambda: get(cluster, "inferenceservice", "direct", namespace),
        lambda s: phase(s) in ("Ready", "Failed"),
        SERVE_TIMEOUT,
        op,
    )
    assert phase(served) == "Ready", json.dumps(served["status"], indent=1)
    assert served["status"]["modelUri"] == single_file
    pod = next(
        p
        for p in items(cluster, "pods", namespace, "dreambooth.dev/inference-service=direct")
        if p["status"].get("phase") == "Running"
    )
    code, content_type, png = post_generate(f"http://{pod['status']['podIP']}:{port}/generate", body, token=None)
    assert (code, content_type) == (200, "image/png"), png[:500]
    assert Image.open(io.BytesIO(png)).size == (64, 64)

    # A model that is not there: the server exits with the error, and the service says so (not Loading forever).
    broken = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "broken"},
        "spec": {
            "model": {"modelUri": f"s3://{bucket}/models/nothing-here/"},
            "resources": {"gpus": 0},
            "storage": store,
            "podTemplate": {"env": ONE_THREAD},
        },
    }
    apply(cluster, broken, namespace)
    failed = wait_for(
        "the broken service Failed",
        lambda: get(cluster, "inferenceservice", "broken", namespace),
        lambda s: phase(s) in ("Ready", "Failed"),
        SERVE_TIMEOUT,
        op,
    )
    assert phase(failed) == "Failed", json.dumps(failed["status"], indent=1)
    assert (condition(failed, "Ready") or {}).get("reason") == "ModelLoadFailed"
    assert "nothing-here" in failed["status"]["message"], failed["status"]["message"]

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
from tests.infra.inference import inference_service
from tests.infra.s3 import S3Server

TRAIN_TIMEOUT = 420.0
SERVE_TIMEOUT = 300.0
TOKEN = "s3cret-token"
# One torch thread per process: the test machine's few cores are shared.
ONE_THREAD = [{"name": "OMP_NUM_THREADS", "value": "1"}]


def storage(cluster: Cluster, s3: S3Server, namespace: str) -> dict[str, Any]:
    credentials_secret(cluster, s3, namespace)
    return {"endpoint": s3.endpoint, "addressingStyle": "path", "credentialsSecret": {"name": "s3-credentials"}}


def settled(cluster: Cluster, namespace: str, op: OperatorProcess, name: str) -> dict[str, Any]:
    """The InferenceService once it is Ready or Failed."""
    found: dict[str, Any] = wait_for(
        f"the service {name} Ready (or Failed)",
        lambda: get(cluster, "inferenceservice", name, namespace),
        lambda s: phase(s) in ("Ready", "Failed"),
        SERVE_TIMEOUT,
        op,
    )
    return found


def serve(
    cluster: Cluster, namespace: str, op: OperatorProcess, name: str, model: dict[str, Any], store: dict[str, Any]
) -> dict[str, Any]:
    """Apply an InferenceService of `model` without auth; return it once it is Ready or Failed."""
    apply(cluster, inference_service(name, model, storage=store, podTemplate={"env": ONE_THREAD}), namespace)
    return settled(cluster, namespace, op, name)


def running_pods(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    pods = items(cluster, "pods", namespace, f"dreambooth.dev/inference-service={name}")
    return [p for p in pods if p["status"].get("phase") == "Running"]


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
    auth = {"bearerTokenSecret": {"name": "serve-token"}}
    isvc = inference_service(
        "dog-server", {"fromJob": "dog"}, storage=store, auth=auth, podTemplate={"env": ONE_THREAD}
    )
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

    try:
        served = settled(cluster, namespace, op, "dog-server")
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

    pods = running_pods(cluster, namespace, "dog-server")
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
    served = serve(cluster, namespace, op, "direct", {"modelUri": single_file, "baseModel": {"tiny": True}}, store)
    assert phase(served) == "Ready", json.dumps(served["status"], indent=1)
    assert served["status"]["modelUri"] == single_file
    pod = running_pods(cluster, namespace, "direct")[0]
    code, content_type, png = post_generate(f"http://{pod['status']['podIP']}:{port}/generate", body, token=None)
    assert (code, content_type) == (200, "image/png"), png[:500]
    assert Image.open(io.BytesIO(png)).size == (64, 64)

    # A model that is not there: the server exits with the error, and the service says so (not Loading forever).
    failed = serve(cluster, namespace, op, "broken", {"modelUri": f"s3://{bucket}/models/nothing-here/"}, store)
    assert phase(failed) == "Failed", json.dumps(failed["status"], indent=1)
    assert (condition(failed, "Ready") or {}).get("reason") == "ModelLoadFailed"
    assert "nothing-here" in failed["status"]["message"], failed["status"]["message"]

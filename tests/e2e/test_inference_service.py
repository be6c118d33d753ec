"""End to end: InferenceServices (fromJob with a token, then a single-file modelUri with the job's LoRA as a subject)
run the real `dreambooth-serve`; a service whose model cannot be loaded is Failed with the server's error.

The operator trains a tiny LoRA job (the real trainer, in pods the node agent runs), then deploys the sampling
server from `model.fromJob`; the node agent runs the Deployment's pod. The test reaches the server on the pod IP (the
Service has no ClusterIP routing here, and the API server proxies to no loopback address), after /readyz says the
model is loaded and warmed up: with the official `openai` client, and with `dreambooth generate --url` (the token
read from the service's auth Secret through the cluster's API, as a user with a port-forward would).
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from tests.e2e.test_operator_training import credentials_secret, phase, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.inference import inference_service
from tests.infra.operator import OperatorProcess, apply, condition, get, items, wait_for
from tests.infra.processes import wait_until
from tests.infra.s3 import S3Server

TRAIN_TIMEOUT = 420.0
SERVE_TIMEOUT = 300.0
TOKEN = "s3cret-token"
DREAMBOOTH = str(Path(sys.executable).parent / "dreambooth")
PROMPT = "a photo of sks dog"
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


def base_url(pod: dict[str, Any]) -> str:
    container = pod["spec"]["containers"][0]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    return f"http://{pod['status']['podIP']}:{port}"


def wait_ready(url: str) -> None:
    """Until /readyz answers 200: the weights are loaded and a warm-up generation ran."""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:  # noqa: S310 - a local test URL
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    wait_until(ready, timeout=SERVE_TIMEOUT, what=f"{url}/readyz")


def api(url: str, key: str | None = None) -> openai.OpenAI:
    """The official client; a server without auth ignores the key the client insists on."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "unused", max_retries=0, timeout=120)


def png_size(b64: str | None) -> tuple[int, int]:
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    assert image.format == "PNG"
    return image.size


def cli_generate(cluster: Cluster, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`dreambooth generate` with the cluster's kubeconfig."""
    return subprocess.run(
        [DREAMBOOTH, "generate", *args, "--namespace", namespace, "--timeout", "180"],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_inference_service_from_a_succeeded_job_serves_pngs_behind_a_token(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess, node_agent: Any, tmp_path: Path
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
    url = base_url(pods[0])
    wait_ready(url)

    # The official client on the pod IP: the token is needed, the default size is the training resolution (64).
    with pytest.raises(openai.AuthenticationError):
        api(url).images.generate(prompt=PROMPT)
    with pytest.raises(openai.AuthenticationError):
        api(url, "wrong").images.generate(prompt=PROMPT)
    answer = api(url, TOKEN).images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 2, "seed": 7})
    assert png_size((answer.data or [])[0].b64_json) == (64, 64)
    assert [m.id for m in api(url, TOKEN).models.list()] == ["base"]

    # `dreambooth generate`, the token read from the service's Secret.
    out = tmp_path / "dog-server"
    args = ["-p", PROMPT, "-n", "2", "--seed", "7", "--steps", "2", "-o", str(out), "--url", url]
    result = cli_generate(cluster, namespace, "dog-server", *args)
    assert result.returncode == 0, result.stderr
    assert "dog-server: generating 2 images of the base model" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["dog-server-7.png", "dog-server-8.png"]
    assert Image.open(out / "dog-server-7.png").size == (64, 64)

    # The same model as one single-file checkpoint (its config from baseModel), without auth, and the job's LoRA
    # weights as the subject `dog`.
    single_file = f"s3://{bucket}/models/dog/model.safetensors"
    lora = f"s3://{bucket}/models/dog/lora"
    model = {"modelUri": single_file, "baseModel": {"tiny": True}}
    apply(
        cluster,
        inference_service(
            "direct", model, storage=store, podTemplate={"env": ONE_THREAD}, adapters=[{"name": "dog", "uri": lora}]
        ),
        namespace,
    )
    served = settled(cluster, namespace, op, "direct")
    assert phase(served) == "Ready", json.dumps(served["status"], indent=1)
    assert served["status"]["modelUri"] == single_file
    direct = base_url(running_pods(cluster, namespace, "direct")[0])
    wait_ready(direct)
    subject_dir = tmp_path / "direct"
    args = ["-p", PROMPT, "--subject", "dog", "--seed", "7", "--steps", "2", "-o", str(subject_dir), "--url", direct]
    result = cli_generate(cluster, namespace, "direct", *args)
    assert result.returncode == 0, result.stderr
    subject_png = (subject_dir / "dog-7.png").read_bytes()
    client = api(direct)  # no auth: any token, or none, is served
    assert [m.id for m in client.models.list()] == ["base", "dog"]
    same = client.images.generate(prompt=PROMPT, model="dog", extra_body={"seed": 7, "num_inference_steps": 2})
    assert base64.b64decode((same.data or [])[0].b64_json or "") == subject_png
    plain = client.images.generate(prompt=PROMPT, extra_body={"seed": 7, "num_inference_steps": 2, "adapters": {}})
    assert base64.b64decode((plain.data or [])[0].b64_json or "") != subject_png  # the subject's weights matter
    missing = cli_generate(cluster, namespace, "direct", "-p", PROMPT, "--subject", "cat", "--url", direct)
    assert missing.returncode == 5, missing.stderr
    assert "the model 'cat' does not exist" in missing.stderr

    # A model that is not there: the server exits with the error, and the service says so (not Loading forever).
    failed = serve(cluster, namespace, op, "broken", {"modelUri": f"s3://{bucket}/models/nothing-here/"}, store)
    assert phase(failed) == "Failed", json.dumps(failed["status"], indent=1)
    assert (condition(failed, "Ready") or {}).get("reason") == "ModelLoadFailed"
    assert "nothing-here" in failed["status"]["message"], failed["status"]["message"]

"""The cluster commands against a real API server and a real S3 server: submit (with photo upload), list,
status, watch and report. The operator is not running here: the tests write status through the status
subresource, as the operator would.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from dreambooth_api import constants as api
from dreambooth_api.evaluation import VLM_API_KEY_ENV
from dreambooth_cli.client import DreamBoothClient
from dreambooth_cli.errors import ExitStatus
from tests.infra.fake_vlm import FakeVlm, task_responder
from tests.infra.paths import ROOT
from tests.infra.processes import wait_until

DREAMBOOTH = str(Path(sys.executable).parent / "dreambooth")
JOB_CRD = f"{api.JOB_PLURAL}.{api.GROUP}"


@pytest.fixture(scope="module")
def crds(cluster: Any) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{JOB_CRD}")


@pytest.fixture
def cli_env(cluster: Any) -> dict[str, str]:
    """The CLI's environment: the admin kubeconfig and no AWS credentials (it must use the job's Secret)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(cluster.env())
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # kubectl finds the plugin here
    return env


def dreambooth(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DREAMBOOTH, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def storage(cluster: Any, s3: Any, namespace: str) -> dict[str, Any]:
    """A bucket, and a Secret in the namespace with its credentials (as the job's pods would get them)."""
    bucket = s3.make_bucket()
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "s3-creds",
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    )
    return {
        "bucket": bucket,
        "spec": {
            "endpoint": s3.endpoint,
            "region": s3.region,
            "addressingStyle": "path",
            "credentialsSecret": {"name": "s3-creds"},
        },
    }


def job_manifest(name: str, bucket: str, storage_spec: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.JOB_KIND,
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"tiny": True},
            "instanceImages": {"uri": f"s3://{bucket}/photos/{name}/", "prompt": "a photo of sks toy"},
            "training": {"maxSteps": 20, "resolution": 32},
            "output": {"uri": f"s3://{bucket}/out/{name}"},
            "storage": storage_spec,
            **spec,
        },
    }


def write_job(tmp_path: Path, job: dict[str, Any]) -> Path:
    path = tmp_path / f"{job['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def photos(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (40 * i, 200, 100)).save(folder / f"img-{i}.png")
    return folder


def patch_status(cluster: Any, namespace: str, name: str, status: dict[str, Any]) -> None:
    cluster.kubectl(
        "patch",
        "dbj",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def create_job(cluster: Any, namespace: str, job: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(job))


@pytest.mark.usefixtures("crds")
def test_submit_uploads_changed_photos_and_creates_the_job(
    cluster: Any, s3: Any, namespace: str, storage: dict[str, Any], cli_env: dict[str, str], tmp_path: Path
) -> None:
    bucket = storage["bucket"]
    folder = photos(tmp_path / "photos")
    job = job_manifest("toy", bucket, storage["spec"])
    result = dreambooth(cli_env, "submit", str(write_job(tmp_path, job)), "--images", str(folder), "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert f"images: 3 uploaded, 0 unchanged, to s3://{bucket}/photos/toy/" in result.stdout
    assert f"dreambooth watch toy -n {namespace}" in result.stdout

    client = s3.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="photos/toy/")["Contents"])
    assert keys == [f"photos/toy/img-{i}.png" for i in range(3)]
    head = client.head_object(Bucket=bucket, Key="photos/toy/img-0.png")
    assert len(head["Metadata"]["sha256"]) == 64
    created = json.loads(cluster.kubectl("get", "dbj", "toy", "-n", namespace, "-o", "json").stdout)
    assert created["spec"]["instanceImages"]["uri"] == f"s3://{bucket}/photos/toy/"

    # The same photos for a second job under the same prefix: nothing is uploaded again; one changed photo is.
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "img-1.png")
    second = job_manifest("toy2", bucket, storage["spec"])
    second["spec"]["instanceImages"]["uri"] = f"s3://{bucket}/photos/toy/"
    result = dreambooth(cli_env, "submit", str(write_job(tmp_path, second)), "--images", str(folder), "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert "images: 1 uploaded, 2 unchanged" in result.stdout

    # Submitting an existing name is a conflict (its own exit status), not invalid input; one line.
    result = dreambooth(cli_env, "submit", str(write_job(tmp_path, job)), "-n", namespace)
    assert result.returncode == ExitStatus.ALREADY_EXISTS, result.stderr
    assert result.stderr.strip() == (
        f"error: {api.JOB_KIND} {namespace}/toy already exists (delete it first, or change metadata.name)"
    )


@pytest.mark.usefixtures("crds")
def test_submit_caption_writes_uploads_and_trains_on_the_sidecars(
    cluster: Any, s3: Any, namespace: str, storage: dict[str, Any], cli_env: dict[str, str], tmp_path: Path
) -> None:
    bucket = storage["bucket"]
    folder = photos(tmp_path / "photos", count=2)
    (folder / "img-1.txt").write_text("my own caption of sks toy\n")
    job = job_manifest("captioned", bucket, storage["spec"])
    job["spec"]["instanceImages"].update({"identifier": "sks", "captions": "auto"})
    with FakeVlm(task_responder({"caption": json.dumps({"caption": "a toy on a red couch"})})) as vlm:
        job["spec"]["vlm"] = {"baseUrl": vlm.base_url, "model": "m", "maxRetries": 0}
        result = dreambooth(
            {**cli_env, VLM_API_KEY_ENV: "sk-user"},
            *("submit", str(write_job(tmp_path, job)), "--images", str(folder), "--caption", "-n", namespace),
        )
    assert result.returncode == 0, result.stderr
    assert f"captions: 1 written by the VLM, 1 kept, 0 the instance prompt, as .txt files in {folder}" in result.stdout
    assert "instanceImages.captions: sidecar" in result.stdout
    assert "images: 4 uploaded" in result.stdout
    assert (folder / "img-0.txt").read_text() == "a sks toy on a red couch\n"
    client = s3.client()
    stored = client.get_object(Bucket=bucket, Key="photos/captioned/img-0.txt")["Body"].read()
    assert stored == b"a sks toy on a red couch\n"
    created = json.loads(cluster.kubectl("get", "dbj", "captioned", "-n", namespace, "-o", "json").stdout)
    assert created["spec"]["instanceImages"]["captions"] == "sidecar"  # trains on what the user can read


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize(
    ("name", "spec", "named"),
    [
        # Prior preservation without a class prompt: only the CRD's CEL rule catches this.
        ("bad", {"priorPreservation": {"enabled": True}}, "classPrompt"),
        # A misspelled field is an error (strict field validation), not silently pruned by the API server.
        ("typo", {"training": {"maxStep": 50, "resolution": 32}}, "spec.training.maxStep"),
    ],
)
def test_submit_rejected_by_dry_run_uploads_and_creates_nothing(
    cluster: Any,
    s3: Any,
    namespace: str,
    storage: dict[str, Any],
    cli_env: dict[str, str],
    tmp_path: Path,
    name: str,
    spec: dict[str, Any],
    named: str,
) -> None:
    bucket = storage["bucket"]
    manifest = job_manifest(name, bucket, storage["spec"], **spec)
    result = dreambooth(
        cli_env, "submit", str(write_job(tmp_path, manifest)), "--images", str(photos(tmp_path / "p")), "-n", namespace
    )
    assert result.returncode == ExitStatus.INVALID_INPUT, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "rejected by the API server (dry run" in line
    assert named in line
    assert "Contents" not in s3.client().list_objects_v2(Bucket=bucket)
    listed = cluster.kubectl("get", "dbj", "-n", namespace, "-o", "name").stdout
    assert name not in listed


@pytest.mark.usefixtures("crds")
def test_list_and_status_show_progress_and_conditions(
    cluster: Any, namespace: str, storage: dict[str, Any], cli_env: dict[str, str]
) -> None:
    create_job(cluster, namespace, job_manifest("shown", storage["bucket"], storage["spec"]))
    patch_status(
        cluster,
        namespace,
        "shown",
        {
            "phase": "Running",
            "progress": {"step": 12, "totalSteps": 20, "loss": 0.25, "stepsPerSecond": 2.0, "etaSeconds": 4.0},
            "restarts": {"preemptions": 1, "failures": 0},
            "usage": {"podSeconds": 90, "gpuSeconds": 720, "gpusPerPod": 8},
            "conditions": [
                {
                    "type": "Running",
                    "status": "True",
                    "reason": "Training",
                    "message": "rank 0 is training",
                    "lastTransitionTime": "2026-11-27T00:00:00Z",
                }
            ],
        },
    )
    listed = dreambooth(cli_env, "list", "-n", namespace)
    assert listed.returncode == 0, listed.stderr
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith("shown"))
    assert row[:7] == ["shown", namespace, "Running", "12/20", "0.2500", "1", "12.0"]

    # The same through kubectl's plugin mechanism (kubectl-dreambooth on PATH).
    plugin = subprocess.run(
        ["kubectl", "dreambooth", "list", "-n", namespace],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert plugin.returncode == 0, plugin.stderr
    plugin_row = next(line.split() for line in plugin.stdout.splitlines() if line.startswith("shown"))
    assert plugin_row[:7] == row[:7]

    shown = dreambooth(cli_env, "status", "shown", "-n", namespace)
    assert shown.returncode == 0, shown.stderr
    assert "step 12/20 loss 0.2500" in shown.stdout
    assert "rank 0 is training" in shown.stdout
    assert "Training" in shown.stdout

    missing = dreambooth(cli_env, "status", "nope", "-n", namespace)
    assert missing.returncode == ExitStatus.NOT_FOUND
    assert missing.stderr.strip() == f"error: {api.JOB_KIND} 'nope' not found in namespace '{namespace}'"


class Watcher:
    """`dreambooth watch` as a subprocess whose stderr is collected line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [DREAMBOOTH, "watch", *args, "--interval", "0.2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        self.lines.extend(self.process.stderr)

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        # stderr belongs to the reader thread; communicate() would race it for the last lines.
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        assert self.process.stdout is not None
        return self.process.returncode, self.process.stdout.read()


@pytest.mark.usefixtures("crds")
def test_watch_follows_progress_until_succeeded(
    cluster: Any, namespace: str, storage: dict[str, Any], cli_env: dict[str, str]
) -> None:
    create_job(cluster, namespace, job_manifest("watched", storage["bucket"], storage["spec"]))
    patch_status(
        cluster, namespace, "watched", {"phase": "Running", "progress": {"step": 5, "totalSteps": 20, "loss": 0.5}}
    )
    watcher = Watcher(cli_env, "watched", "-n", namespace)
    try:
        wait_until(lambda: watcher.saw("step 5/20 loss 0.5000"), timeout=60, what="watch to show step 5")
        patch_status(cluster, namespace, "watched", {"progress": {"step": 15, "totalSteps": 20, "loss": 0.2}})
        wait_until(lambda: watcher.saw("step 15/20 loss 0.2000"), timeout=60, what="watch to show step 15")
        patch_status(
            cluster,
            namespace,
            "watched",
            {"phase": "Succeeded", "progress": {"step": 20, "totalSteps": 20}, "outputs": {"modelUri": "s3://b/m"}},
        )
        code, stdout = watcher.finish()
    finally:
        watcher.process.kill()
    assert code == 0, watcher.lines
    assert "watched succeeded; model: s3://b/m" in stdout


@pytest.mark.usefixtures("crds")
def test_watch_exits_non_zero_when_the_job_fails(
    cluster: Any, namespace: str, storage: dict[str, Any], cli_env: dict[str, str]
) -> None:
    create_job(cluster, namespace, job_manifest("doomed", storage["bucket"], storage["spec"]))
    watcher = Watcher(cli_env, "doomed", "-n", namespace)
    try:
        wait_until(lambda: watcher.saw("doomed: Pending"), timeout=60, what="watch to start")
        patch_status(
            cluster,
            namespace,
            "doomed",
            {
                "phase": "Failed",
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "InvalidInput",
                        "message": "instance image img-2.png is not a decodable image",
                        "lastTransitionTime": "2026-11-27T00:00:00Z",
                    }
                ],
            },
        )
        code, _ = watcher.finish()
    finally:
        watcher.process.kill()
    assert code == ExitStatus.JOB_FAILED
    assert (
        watcher.lines[-1].strip()
        == "error: doomed failed: InvalidInput: instance image img-2.png is not a decodable image"
    )
    # `status` of the failed job prints its details and exits 4 too, with the same one-line error.
    status = dreambooth(cli_env, "status", "doomed", "-n", namespace)
    assert status.returncode == ExitStatus.JOB_FAILED
    assert "InvalidInput" in status.stdout
    assert (
        status.stderr.strip() == "error: doomed failed: InvalidInput: instance image img-2.png is not a decodable image"
    )


@pytest.mark.usefixtures("crds")
def test_report_of_a_job_reads_its_outputs_from_s3(
    cluster: Any, s3: Any, namespace: str, storage: dict[str, Any], cli_env: dict[str, str], tmp_path: Path
) -> None:
    bucket = storage["bucket"]
    create_job(cluster, namespace, job_manifest("reported", bucket, storage["spec"]))
    client = s3.client()
    prefix = "out/reported/"
    metrics = "\n".join(json.dumps({"step": s, "loss": 1 / s, "lr": 1e-4, "time": 1e9 + s}) for s in range(1, 21))
    client.put_object(Bucket=bucket, Key=prefix + "metrics.jsonl", Body=metrics.encode())
    client.put_object(Bucket=bucket, Key=prefix + "config.json", Body=json.dumps({"name": "reported"}).encode())
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(png, format="PNG")
    client.put_object(Bucket=bucket, Key=prefix + "samples/step-00000020/p0-i0.png", Body=png.getvalue())
    client.put_object(Bucket=bucket, Key=prefix + "checkpoints/step-00000020/manifest.json", Body=b'{"files": {}}')
    weights_key = prefix + "checkpoints/step-00000020/weights.safetensors"
    client.put_object(Bucket=bucket, Key=weights_key, Body=os.urandom(1024))

    run = {"uid": "u1", "start": "2026-11-27T00:00:00Z", "end": "2026-11-27T00:02:30Z", "final": True}
    usage = {"podSeconds": 150, "gpuSeconds": 600, "gpusPerPod": 4, "pods": [run]}
    patch_status(cluster, namespace, "reported", {"usage": usage})

    out = tmp_path / "r.html"
    result = dreambooth(cli_env, "report", "reported", "-n", namespace, "-o", str(out))
    assert result.returncode == 0, result.stderr
    html = out.read_text()
    assert "DreamBooth report: reported" in html
    assert base64.b64encode(png.getvalue()).decode() in html
    assert html.count("<polyline") == 3
    assert "step-00000020" in html
    assert "<th>GPU time (all pods and attempts)</th><td>10.0 GPU-min (1 pod(s) x 4 GPU(s), 150 pod-s)</td>" in html


@pytest.mark.usefixtures("crds")
def test_the_client_evaluate_sets_a_fresh_request_and_returns_the_operators_outcome(
    cluster: Any, namespace: str, storage: dict[str, Any]
) -> None:
    """DreamBoothClient.evaluate (what `dreambooth evaluate NAME` runs): the annotation gets a fresh token, the
    progress lines are the operator's messages about this request, and it returns once the operator served it, with
    the outcome and the new scores (the test writes the status the operator would)."""
    create_job(cluster, namespace, job_manifest("evaluated", storage["bucket"], storage["spec"]))
    patch_status(cluster, namespace, "evaluated", {"phase": "Succeeded", "outputs": {"modelUri": "s3://m"}})
    client = DreamBoothClient(cluster.kubeconfig, namespace=namespace)
    heard: list[str] = []
    served: list[Any] = []
    worker = threading.Thread(
        target=lambda: served.append(client.evaluate("evaluated", timeout=60, interval=0.2, on_progress=heard.append)),
        daemon=True,
    )
    worker.start()

    def requested() -> str:
        job = json.loads(cluster.kubectl("get", "dbj", "evaluated", "-n", namespace, "-o", "json").stdout)
        return str((job["metadata"].get("annotations") or {}).get(api.ANNOTATION_EVALUATE) or "")

    wait_until(lambda: bool(requested()), timeout=60, what="the evaluation request")
    token = requested()

    def reevaluated(reason: str, status: str, message: str) -> dict[str, Any]:
        now = "2026-12-06T12:00:00Z"
        return {
            "type": "Reevaluated",
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }

    running = f"request {token}: evaluating the exported model again (Job evaluated-eval)"
    patch_status(cluster, namespace, "evaluated", {"conditions": [reevaluated("Reevaluating", "False", running)]})
    progress = "evaluating the exported model again (Job evaluated-eval)"
    wait_until(lambda: progress in heard, timeout=60, what="the operator's progress line")
    scores = {"dino": 0.75, "clipI": 0.5}
    done = f"request {token}: dino 0.75"
    patch_status(
        cluster,
        namespace,
        "evaluated",
        {
            "observedEvaluateRequest": token,
            "conditions": [reevaluated("Reevaluated", "True", done)],
            "outputs": {"modelUri": "s3://m", "evaluation": scores, "qualityGate": "passed"},
        },
    )
    worker.join(timeout=60)
    assert served, "evaluate did not return"
    (result,) = served
    assert result.token == token
    assert result.outcome.ok, result.outcome
    assert result.outcome.message == done
    assert result.job.raw["status"]["outputs"]["evaluation"] == scores
    # The request, then each new line of the operator's about it, once (waiting, if read before it wrote one), the
    # outcome's last.
    assert heard[0] == f"evaluation requested ({api.ANNOTATION_EVALUATE}={token})"
    assert heard[1:] in ([progress, "dino 0.75"], ["waiting for the operator", progress, "dino 0.75"]), heard

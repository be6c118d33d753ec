"""The README's DreamBoothClient example runs as written against a real API server and a real S3 server.

The integration tier runs no operator and no node agent, so no pod trains the job. The test plays the operator's
part instead, as test_cli_cluster.py does: once the snippet has created the job, it writes status through the
status subresource (Running with progress, then Succeeded with a model URI). So everything the snippet does is
real (the kubeconfig, the dry run, the photo upload with the job's Secret, the create, the watch reads) except who
writes the status; the end-to-end training of the same manifest is tests/e2e's business.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from dreambooth_api import constants as api
from tests.infra.paths import ROOT
from tests.infra.processes import wait_until

JOB_CRD = f"{api.JOB_PLURAL}.{api.GROUP}"


def readme_example() -> str:
    """The one ```python block of the README's "Run a job" section, exactly as written."""
    section = (ROOT / "README.md").read_text().split("\n## Run a job\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert "DreamBoothClient" in block
    return str(block)


def kubeconfig_in(namespace: str, admin: Path, dest: Path) -> Path:
    """The admin kubeconfig with `namespace` as its current context's namespace (what `kubectl config
    set-context --current --namespace` writes), so that the snippet's DreamBoothClient() picks it."""
    config = yaml.safe_load(admin.read_text())
    (context,) = [c for c in config["contexts"] if c["name"] == config["current-context"]]
    context["context"]["namespace"] = namespace
    dest.write_text(yaml.safe_dump(config))
    return dest


def patch_status(cluster: Any, namespace: str, name: str, status: dict[str, Any]) -> None:
    patch = json.dumps({"status": status})
    cluster.kubectl("patch", "dbj", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", patch)


def test_the_readme_client_example_submits_watches_and_reports(
    cluster: Any, s3: Any, namespace: str, tmp_path: Path
) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{JOB_CRD}")

    # The working folder the snippet expects: examples/minimal-job.yaml (its placeholders replaced, as the
    # examples README says) and photos/.
    bucket = s3.make_bucket()
    job = yaml.safe_load((ROOT / "examples/minimal-job.yaml").read_text())
    name = job["metadata"]["name"]
    job["spec"]["instanceImages"]["uri"] = f"s3://{bucket}/subjects/dog/"
    job["spec"]["output"]["uri"] = f"s3://{bucket}/models/{name}/"
    job["spec"]["storage"]["endpoint"] = s3.endpoint
    job["spec"]["storage"]["region"] = s3.region
    secret = job["spec"]["storage"]["credentialsSecret"]["name"]
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples/minimal-job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (60 * i, 120, 200)).save(tmp_path / "photos" / f"dog-{i}.png")
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        secret,
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    )

    # No AWS_* credentials: the client must upload with the job's Secret, as `dreambooth submit` does.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["KUBECONFIG"] = str(kubeconfig_in(namespace, cluster.kubeconfig, tmp_path / "kubeconfig"))
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    process = subprocess.Popen(
        [sys.executable, "-c", readme_example()],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    try:
        wait_until(
            lambda: cluster.kubectl("get", "dbj", name, "-n", namespace, check=False).returncode == 0
            or process.poll() is not None,
            timeout=60,
            what="the snippet to create the job",
        )
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        patch_status(cluster, namespace, name, {"phase": "Running", "progress": {"step": 5, "totalSteps": 20}})
        wait_until(lambda: "Running step 5/20\n" in lines, timeout=60, what="the watch to show step 5")
        model = f"s3://{bucket}/models/{name}/model"
        patch_status(
            cluster,
            namespace,
            name,
            {"phase": "Succeeded", "progress": {"step": 20, "totalSteps": 20}, "outputs": {"modelUri": model}},
        )
        process.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""
    # One line per status read (every 2 s): Pending until the test wrote Running, then the final two.
    *reads, last = lines
    seen = {"Running step 5/20\n", "Succeeded step 20/20\n"}
    assert seen <= set(reads) <= {"Pending step 0/20\n", *seen}, lines
    assert reads[-1] == "Succeeded step 20/20\n"
    assert last == f"Succeeded {model}\n"

    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="subjects/dog/")["Contents"])
    assert keys == [f"subjects/dog/dog-{i}.png" for i in range(3)]
    created = json.loads(cluster.kubectl("get", "dbj", name, "-n", namespace, "-o", "json").stdout)
    assert created["spec"]["instanceImages"]["uri"] == f"s3://{bucket}/subjects/dog/"

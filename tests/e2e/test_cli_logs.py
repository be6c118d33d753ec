"""`dreambooth logs NAME --rank N [--follow]`: the API server's pod log call, served by the node agent's
kubelet log endpoint, for the newest attempt's pod of that rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from dreambooth_api import constants as api
from dreambooth_cli.errors import ExitStatus
from tests.infra.paths import ROOT
from tests.infra.processes import wait_until

DREAMBOOTH = str(Path(sys.executable).parent / "dreambooth")
INDEX = "batch.kubernetes.io/job-completion-index"


def pod(name: str, job: str, rank: int, attempt: int, code: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {api.LABEL_JOB_NAME: job, api.LABEL_ATTEMPT: str(attempt), INDEX: str(rank)},
            "annotations": {INDEX: str(rank)},
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "trainer", "image": "trainer:test", "command": [sys.executable, "-u", "-c", code]}],
        },
    }


def phase(cluster: Any, namespace: str, name: str) -> str:
    return cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "jsonpath={.status.phase}").stdout


def test_logs_of_a_rank_and_follow(cluster: Any, node_agent: Any, namespace: str) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{api.JOB_PLURAL}.{api.GROUP}")
    job = {
        "apiVersion": api.API_VERSION,
        "kind": api.JOB_KIND,
        "metadata": {"name": "logged"},
        "spec": {
            "baseModel": {"tiny": True},
            "instanceImages": {"uri": "s3://bucket/photos/", "prompt": "a photo of sks toy"},
            "output": {"uri": "s3://bucket/out", "checkpointUri": "s3://bucket/ckpt"},
            "resources": {"nodes": 2},
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(job))
    emit = "import json\nfor i in range(3): print(json.dumps({{'event': 'step', 'step': i, 'who': '{who}'}}))"
    pods = [
        pod("logged-a0-r0", "logged", 0, 0, emit.format(who="attempt0-rank0")),
        pod("logged-a1-r0", "logged", 0, 1, emit.format(who="attempt1-rank0")),
        pod("logged-a1-r1", "logged", 1, 1, emit.format(who="attempt1-rank1")),
        # Rank 1 of attempt 2 is still running when --follow starts: it prints, then ends after a while.
        pod(
            "logged-a2-r1",
            "logged",
            1,
            2,
            "import time\nfor i in range(6):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.5)",
        ),
    ]
    for p in pods[:3]:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(p))
    for p in pods[:3]:
        name = p["metadata"]["name"]
        wait_until(
            lambda n=name: phase(cluster, namespace, n) == "Succeeded",
            timeout=120,
            what=f"{name} to succeed",
            details=lambda n=name: cluster.kubectl("get", "pod", n, "-n", namespace, "-o", "jsonpath={.status}").stdout
            + "\n"
            + node_agent.log_tail(),
        )

    env = {**os.environ, **cluster.env()}
    result = subprocess.run(
        [DREAMBOOTH, "logs", "logged", "--rank", "0", "-n", namespace],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # One readable line per JSON event; --json prints the trainer's lines as they are.
    assert result.stdout.splitlines() == [f"info step step={i} who=attempt1-rank0" for i in range(3)]
    raw = subprocess.run(
        [DREAMBOOTH, "logs", "logged", "--rank", "0", "--json", "-n", namespace],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert raw.returncode == 0, raw.stderr
    lines = [json.loads(line) for line in raw.stdout.splitlines()]
    assert [(e["step"], e["who"]) for e in lines] == [(i, "attempt1-rank0") for i in range(3)]

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pods[3]))
    wait_until(
        lambda: phase(cluster, namespace, "logged-a2-r1") == "Running", timeout=120, what="the follow pod to run"
    )
    started = time.monotonic()
    follow = subprocess.run(
        [DREAMBOOTH, "logs", "logged", "--rank", "1", "--follow", "-n", namespace],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout.splitlines() == [f"tick {i}" for i in range(6)]
    # The log stream ends when the process exits; the node agent writes the pod's phase right after that.
    deadline = time.monotonic() + 30
    while phase(cluster, namespace, "logged-a2-r1") != "Succeeded" and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the API for the phase, not a fixed wait
    assert phase(cluster, namespace, "logged-a2-r1") == "Succeeded"
    assert time.monotonic() - started < 100

    missing = subprocess.run(
        [DREAMBOOTH, "logs", "logged", "--rank", "7", "-n", namespace],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == ExitStatus.INVALID_INPUT
    assert missing.stderr.strip() == "error: logged has 2 node(s): ranks 0-1 (not 7)"


@pytest.fixture(autouse=True)
def _pods_cleanup(cluster: Any, namespace: str) -> Any:
    yield
    cluster.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=false", check=False)

"""End to end: while a job trains, `kubectl get dbj` shows its progress moving (kubeflow/trainer#2779's gap).

The operator polls rank 0's /progress on every reconcile; here its resync interval is 1 s so that a short tiny
job is observed at several steps. What the user sees is read through the printer columns, as `kubectl get` prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_operator_training import TRAIN_TIMEOUT, credentials_secret, example, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, running_operator, wait_for
from tests.infra.s3 import S3Server

STEPS = 120


@pytest.fixture
def fast_op(cluster: Cluster, namespace: str, infra_log_dir: Path, node_agent: Any) -> Iterator[OperatorProcess]:
    env = {"DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS": "1"}
    with running_operator(cluster, infra_log_dir, [namespace], env) as operator:
        yield operator


def get_row(cluster: Cluster, namespace: str, name: str) -> dict[str, str] | None:
    """One `kubectl get dbj NAME` row as {column: value}."""
    out = cluster.kubectl("get", "dbj", name, "-n", namespace, check=False)
    if out.returncode != 0:
        return None
    header, row = out.stdout.splitlines()[:2]
    return dict(zip(header.split(), row.split(), strict=False))


def test_kubectl_get_shows_progress_moving_while_training(
    cluster: Cluster, namespace: str, s3: S3Server, fast_op: OperatorProcess
) -> None:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    job = example(s3, bucket)
    job["spec"]["training"]["maxSteps"] = STEPS
    apply(cluster, job, namespace)
    name = job["metadata"]["name"]

    rows: list[dict[str, str]] = []

    def fetch() -> dict[str, str] | None:
        row = get_row(cluster, namespace, name)
        if row:
            rows.append(row)
        return row

    final = wait_for("Succeeded", fetch, lambda r: r.get("PHASE") in ("Succeeded", "Failed"), TRAIN_TIMEOUT, fast_op)
    assert final["PHASE"] == "Succeeded", rows[-5:]
    assert final["PROGRESS"] == f"{STEPS}/{STEPS}"

    running = [r for r in rows if r.get("PHASE") == "Running" and "/" in r.get("PROGRESS", "")]
    steps = [int(r["PROGRESS"].split("/")[0]) for r in running]
    intermediate = sorted({s for s in steps if 0 < s < STEPS})
    assert len(intermediate) >= 2, f"progress seen while Running: {steps}"
    assert steps == sorted(steps), f"progress went backwards: {steps}"
    assert all(r["PROGRESS"].endswith(f"/{STEPS}") for r in running)
    # The loss column is filled from the same poll.
    losses = [float(r["LOSS"]) for r in running if int(r["PROGRESS"].split("/")[0]) > 0]
    assert losses, running[-3:]
    assert all(loss > 0 for loss in losses)

"""End to end: a job whose trainer image cannot be pulled says so in its status, and fixing spec.podTemplate.image
replaces the stuck attempt at once (no failure counted), after which the job trains to completion.

The node agent fails to pull images from registries under the reserved `.invalid` domain, as a kubelet does for a
mistyped registry (ErrImagePull, then ImagePullBackOff).
"""

from __future__ import annotations

import json
from typing import Any

from tests.e2e.test_operator_training import TRAIN_TIMEOUT, phase, staged_example
from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, condition, event_reasons, get, wait_for
from tests.infra.s3 import S3Server

BAD_IMAGE = "registry.invalid/dreambooth-operator/trainer:typo"
GOOD_IMAGE = "ghcr.io/dreambooth-operator/trainer:0.1.0"


def test_a_bad_image_is_reported_and_fixing_the_spec_recovers_the_job(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess
) -> None:
    _, job = staged_example(cluster, s3, namespace)
    job["spec"]["podTemplate"]["image"] = BAD_IMAGE
    apply(cluster, job, namespace)

    def fetch() -> dict[str, Any] | None:
        return get(cluster, "dreamboothjob", "minimal", namespace)

    stuck = wait_for(
        "ImagePullFailed",
        fetch,
        lambda j: (condition(j, "Running") or {}).get("reason") == "ImagePullFailed",
        120,
        op,
    )
    assert phase(stuck) == "Pending"
    assert "no such host" in stuck["status"]["message"]
    assert "registry.invalid" in (condition(stuck, "Running") or {}).get("message", "")

    patch = {"spec": {"podTemplate": {"image": GOOD_IMAGE}}}
    cluster.kubectl("patch", "dreamboothjob", "minimal", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    done = wait_for("Succeeded", fetch, lambda j: phase(j) in ("Succeeded", "Failed"), TRAIN_TIMEOUT, op)
    status = done["status"]
    assert phase(done) == "Succeeded", json.dumps(status, indent=1)
    assert status["attempt"] == 1  # the stuck attempt was replaced
    assert status["restarts"] == {"preemptions": 0, "failures": 0, "total": 0}
    assert {"ImagePullFailed", "PodSpecChanged", "TrainingCompleted"} <= event_reasons(cluster, namespace, "minimal")

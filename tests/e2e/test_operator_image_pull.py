"""End to end: a job whose trainer image cannot be pulled says so in its status, and fixing spec.podTemplate.image
replaces what is stuck at once (no failure counted), after which the job trains to completion. With the pre-flight
(the default) the stuck pod is the input check's and the first attempt is built from the fixed spec; without it the
stuck attempt is replaced by attempt 1.

The node agent fails to pull images from registries under the reserved `.invalid` domain, as a kubelet does for a
mistyped registry (ErrImagePull, then ImagePullBackOff).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.test_operator_training import TRAIN_TIMEOUT, phase, staged_example
from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, condition, event_reasons, get, wait_for
from tests.infra.s3 import S3Server

BAD_IMAGE = "registry.invalid/dreambooth-operator/trainer:typo"
GOOD_IMAGE = "ghcr.io/dreambooth-operator/trainer:0.1.0"


@pytest.mark.parametrize(("preflight", "first_attempt"), [(True, 0), (False, 1)], ids=["input check", "attempt"])
def test_a_bad_image_is_reported_and_fixing_the_spec_recovers_the_job(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess, preflight: bool, first_attempt: int
) -> None:
    _, job = staged_example(cluster, s3, namespace)
    job["spec"]["podTemplate"]["image"] = BAD_IMAGE
    job["spec"].setdefault("runPolicy", {})["preflight"] = preflight
    apply(cluster, job, namespace)

    def fetch() -> dict[str, Any] | None:
        return get(cluster, "dreamboothjob", "minimal", namespace)

    says = "InputChecked" if preflight else "Running"  # the condition of the pod that cannot start
    stuck = wait_for(
        "ImagePullFailed",
        fetch,
        lambda j: (condition(j, says) or {}).get("reason") == "ImagePullFailed",
        120,
        op,
    )
    assert phase(stuck) == "Pending"
    assert stuck["status"]["reason"] == "ImagePullFailed"  # the Reason column
    assert "no such host" in stuck["status"]["message"]
    assert "registry.invalid" in (condition(stuck, says) or {}).get("message", "")

    patch = {"spec": {"podTemplate": {"image": GOOD_IMAGE}}}
    cluster.kubectl("patch", "dreamboothjob", "minimal", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    done = wait_for("Succeeded", fetch, lambda j: phase(j) in ("Succeeded", "Failed"), TRAIN_TIMEOUT, op)
    status = done["status"]
    assert phase(done) == "Succeeded", json.dumps(status, indent=1)
    assert status["attempt"] == first_attempt  # a stuck attempt was replaced; a stuck check never made one
    assert status["restarts"] == {"preemptions": 0, "failures": 0, "total": 0}
    assert {"ImagePullFailed", "PodSpecChanged", "TrainingCompleted"} <= event_reasons(cluster, namespace, "minimal")

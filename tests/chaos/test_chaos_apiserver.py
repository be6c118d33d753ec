"""API-server chaos: kube-apiserver stopped for 30 s in the middle of a job (the session's control plane: etcd,
the controllers and the scheduler keep running, and the API server comes back on the same port with the same
flags, tests/infra/controlplane.py). The trainer carries on through the outage (its /progress keeps moving and its
pod is never replaced: the node agent, like a kubelet, retries its status writes), the operator recovers without a
restart, the status catches up with the final step count and phase, and no batch Job or pod is created twice."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest

from dreambooth_api.env import TRAINER_METRICS_PORT
from tests.chaos.creations import Creations
from tests.e2e.test_operator_training import SELECTOR, phase, staged_example, wait_until_finished
from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, get, items, wait_for
from tests.infra.processes import http_get
from tests.infra.reliability import record
from tests.infra.s3 import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

STEPS = 60
OUTAGE_SECONDS = 30.0
TIMEOUT = 300.0


def _trainer_step(pod_ip: str) -> int | None:
    """Rank 0's step from its /progress, read directly (not through the API server); None when it does not answer."""
    try:
        code, body = http_get(f"http://{pod_ip}:{TRAINER_METRICS_PORT}/progress", timeout=2)
    except OSError:
        return None
    return int(json.loads(body)["step"]) if code == 200 else None


def test_apiserver_outage(
    cluster: Cluster,
    namespace: str,
    s3: S3Server,
    op: OperatorProcess,
    node_agent: Any,
    chaos_rng: random.Random,
) -> None:
    _, job = staged_example(cluster, s3, namespace, steps=STEPS)
    at_step = chaos_rng.randint(2, 10)
    with Creations(cluster, namespace) as seen:
        apply(cluster, job, namespace)

        def training_at(step: int = at_step) -> dict[str, Any] | None:
            dbj = get(cluster, "dreamboothjob", "minimal", namespace) or {}
            done = ((dbj.get("status") or {}).get("progress") or {}).get("step") or 0
            running = [p for p in items(cluster, "pods", namespace, SELECTOR) if p["status"].get("phase") == "Running"]
            return running[0] if done >= step and len(running) == 1 else None

        pod = wait_for(f"step {at_step}", training_at, bool, TIMEOUT, op)
        pod_ip = pod["status"]["podIP"]
        before = _trainer_step(pod_ip)
        assert before is not None
        cluster.stop_apiserver()
        stopped = time.monotonic()
        try:
            with pytest.raises(OSError, match="refused"):  # really down
                cluster.readyz()
            steps_seen = [before]
            while time.monotonic() - stopped < OUTAGE_SECONDS:  # the outage's length is the scenario itself
                step = _trainer_step(pod_ip)
                if step is not None:
                    steps_seen.append(step)
                time.sleep(1.0)
        finally:
            cluster.start_apiserver()
        outage = round(time.monotonic() - stopped, 1)
        assert op.process is not None
        assert op.process.running(), op.log_tail()  # the operator rode the outage out, no restart
        dbj = wait_until_finished(cluster, namespace, op, node_agent)
    status = dbj["status"]
    assert phase(dbj) == "Succeeded", json.dumps(status, indent=1)
    # The trainer went on during the outage, in the same pod: nothing restarted, nothing redone.
    assert max(steps_seen) > before, f"the trainer made no step during the outage: {steps_seen}"
    assert status["progressText"] == f"{STEPS}/{STEPS}"
    assert status["progress"]["step"] == STEPS
    assert status["restarts"]["total"] == 0, status["restarts"]
    assert status["progress"]["stepsRedone"] == 0
    # Nothing created twice: the training Job and the input check, one pod each.
    assert {name: len(uids) for name, uids in seen.uids("jobs").items()} == {"minimal-a0": 1, "minimal-check": 1}
    assert seen.duplicates("pods") == {}
    assert len(seen.uids("pods")) == 2, seen.uids("pods")
    record(
        "apiserver.outage",
        injected=1,
        survived=1,
        stepsRedone=0,
        dataLost=0,
        outageSeconds=outage,
        stepsDuringOutage=max(steps_seen) - before,
    )

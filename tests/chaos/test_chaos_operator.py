"""Operator chaos: SIGKILLs of the operator at random moments of several jobs' lives (20 of a standalone
operator across three jobs; then the leader of two peered replicas), restarted each time as its Deployment would
restart it. No batch Job or pod is ever created twice (every creation is seen by uid, tests/chaos/creations.py),
and every job ends as it should: the two good ones Succeeded with all their steps and no restart, the one with an
unreadable photo Failed with InvalidInput from its input check."""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.creations import Creations
from tests.chaos.kills import kill_operator
from tests.e2e.test_operator_training import phase, staged_example
from tests.infra.controlplane import Cluster
from tests.infra.operator import RESTRICTED, ChartIdentity, OperatorProcess, apply, condition, get, items, wait_for
from tests.infra.reliability import record
from tests.infra.s3 import S3Server
from tests.integration.test_operator_peering import PEERING_CRDS, PEERING_NAME, PeeredOperator

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

KILLS = 20
STEPS = 15
CREATE_AT = {0: "good-a", 4: "bad", 8: "good-b"}
"""Which job is created just before which kill: the kills fall on every stage of the three jobs' lives."""
PAUSE = (0.3, 2.5)
"""Seconds between an operator's start (liveness endpoint up) and its SIGKILL, drawn uniformly."""
TIMEOUT = 300.0


def _jobs(cluster: Cluster, s3: S3Server, namespace: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Good jobs: the minimal example at STEPS steps, each with its own output; "bad": a photo that is no image."""
    bucket, base = staged_example(cluster, s3, namespace, steps=STEPS)
    s3.client().put_object(Bucket=bucket, Key="subjects/bad/broken.png", Body=b"not an image")
    jobs = {}
    for name in names:
        job = copy.deepcopy(base)
        job["metadata"]["name"] = name
        job["spec"]["output"]["uri"] = f"s3://{bucket}/models/{name}/"
        if name == "bad":
            job["spec"]["instanceImages"]["uri"] = f"s3://{bucket}/subjects/bad/"
        jobs[name] = job
    return jobs


def _phases(cluster: Cluster, namespace: str) -> dict[str, str | None]:
    return {j["metadata"]["name"]: phase(j) for j in items(cluster, "dreamboothjobs", namespace)}


def _finished(cluster: Cluster, namespace: str, names: list[str]) -> dict[str, str | None] | None:
    phases = _phases(cluster, namespace)
    done = all(phases.get(n) in ("Succeeded", "Failed") for n in names)
    return phases if done else None


def _check_outcome(cluster: Cluster, namespace: str, seen: Creations, names: list[str], seed_info: str) -> None:
    for name in names:
        dbj = get(cluster, "dreamboothjob", name, namespace) or {}
        status = dbj.get("status") or {}
        if name == "bad":
            assert phase(dbj) == "Failed", f"{seed_info} {name}: {json.dumps(status)}"
            assert (condition(dbj, "Failed") or {}).get("reason") == "InvalidInput", f"{seed_info} {status}"
        else:
            assert phase(dbj) == "Succeeded", f"{seed_info} {name}: {json.dumps(status)}"
            assert status["progressText"] == f"{STEPS}/{STEPS}", status
            assert status["restarts"]["total"] == 0, status["restarts"]
    # Never a duplicate: each name had one object, the Jobs are the expected ones, each ran one pod.
    assert seen.duplicates("jobs") == {}, seed_info
    assert seen.duplicates("pods") == {}, seed_info
    expected = {f"{n}-check" for n in names} | {f"{n}-a0" for n in names if n != "bad"}
    assert set(seen.uids("jobs")) == expected, seed_info
    pods_by_job = seen.count_by_label("pods", "job-name")
    assert pods_by_job == dict.fromkeys(expected, 1), f"{seed_info} pods per batch Job: {pods_by_job}"


def test_operator_kills(
    cluster: Cluster,
    namespace: str,
    s3: S3Server,
    op: OperatorProcess,
    node_agent: Any,
    chaos_rng: random.Random,
) -> None:
    names = list(CREATE_AT.values())
    jobs = _jobs(cluster, s3, namespace, names)
    killed_in: list[dict[str, str | None]] = []
    with Creations(cluster, namespace) as seen:
        for kill in range(KILLS):
            if kill in CREATE_AT:
                apply(cluster, jobs[CREATE_AT[kill]], namespace)
            time.sleep(chaos_rng.uniform(*PAUSE))  # a random moment of the operator's life, not a readiness wait
            kill_operator(op)
            killed_in.append(_phases(cluster, namespace))
            op.start()
        wait_for("every job to finish", lambda: _finished(cluster, namespace, names), bool, TIMEOUT, op)
        _check_outcome(cluster, namespace, seen, names, f"(kills at phases {killed_in})")
    by_phase: dict[str, int] = {}
    for phases in killed_in:
        for name in names:
            key = str(phases.get(name) or "absent")
            by_phase[key] = by_phase.get(key, 0) + 1
    record("operator.sigkill", injected=KILLS, survived=KILLS, dataLost=0, jobs=len(names), jobPhasesAtKill=by_phase)


def test_peered_leader_kill(
    cluster: Cluster,
    namespace: str,
    s3: S3Server,
    node_agent: Any,
    infra_log_dir: Path,
    chaos_rng: random.Random,
) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(PEERING_CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/kopfpeerings.kopf.dev")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING_NAME}}
    apply(cluster, peering, namespace)
    cluster.kubectl("label", "--overwrite", "namespace", namespace, *RESTRICTED)
    identity = ChartIdentity.install(cluster, [namespace], infra_log_dir)
    env = {"KUBECONFIG": str(identity.kubeconfig)}  # the chart's ServiceAccount, as in the e2e harness
    ops = [PeeredOperator(cluster, infra_log_dir, [namespace], env, identity=identity) for _ in range(2)]
    try:
        for replica in ops:
            replica.start()
        leader, standby = sorted(ops, key=lambda o: o.priority(), reverse=True)
        wait_for("the standby to pause", standby.log_text, lambda t: "Pausing operations in favour of" in t, 60)
        (job,) = _jobs(cluster, s3, namespace, ["good"]).values()
        with Creations(cluster, namespace) as seen:
            apply(cluster, job, namespace)
            at_step = chaos_rng.randint(1, STEPS - 5)

            def progressed() -> bool:
                dbj = get(cluster, "dreamboothjob", "good", namespace) or {}
                return bool((((dbj.get("status") or {}).get("progress") or {}).get("step") or 0) >= at_step)

            wait_for(f"step {at_step}", progressed, bool, TIMEOUT, leader)
            kill_operator(leader)
            wait_for("the standby to resume", standby.log_text, lambda t: "Resuming operations" in t, 120, standby)
            wait_for("the job to finish", lambda: _finished(cluster, namespace, ["good"]), bool, TIMEOUT, standby)
            _check_outcome(cluster, namespace, seen, ["good"], f"(leader killed at step {at_step})")
        assert [p["metadata"]["name"] for p in items(cluster, "jobs.batch", namespace)] == ["good-a0", "good-check"]
    finally:
        for replica in ops:
            replica.stop()
        identity.remove()
    record("operator.peered-leader-sigkill", injected=1, survived=1, dataLost=0, atStep=at_step)

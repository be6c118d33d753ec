"""End to end: a job with two GPUs per pod runs two ranks in one pod, under the trainer's local-rank supervisor
(launcher.py), through the operator and the node agent. An eviction stops both ranks at one step, the pod exits 12
(a preemption, not a failure), and the replacement pod resumes from rank 0's checkpoint with both ranks in step.
"""

from __future__ import annotations

import json
from typing import Any

from tests.e2e.test_operator_training import (
    SELECTOR,
    evict_after_a_checkpoint,
    staged_example,
    wait_until_succeeded_after_one_preemption,
)
from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, items
from tests.infra.s3 import S3Server

STEPS = 30


def _events(node_agent: Any, namespace: str, pod: str, event: str) -> list[dict[str, Any]]:
    lines = node_agent.logs(namespace, pod).splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == event]


def test_two_ranks_in_one_pod_stop_together_on_eviction_and_resume(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess, node_agent: Any
) -> None:
    _, job = staged_example(cluster, s3, namespace, steps=STEPS)
    job["spec"]["resources"] = {"gpusPerNode": 2}
    apply(cluster, job, namespace)
    evicted = evict_after_a_checkpoint(cluster, namespace, op)
    wait_until_succeeded_after_one_preemption(cluster, namespace, op, node_agent, steps=STEPS)

    # The evicted pod: the supervisor started two local ranks, and both stopped as preempted (exit 12).
    assert [e["procsPerNode"] for e in _events(node_agent, namespace, evicted, "launching_local_ranks")] == [2]
    exits = _events(node_agent, namespace, evicted, "rank_exited")
    assert sorted((e["localRank"], e["exitCode"]) for e in exits) == [(0, 12), (1, 12)]
    stopped = {e["rank"]: e["step"] for e in _events(node_agent, namespace, evicted, "preempted")}
    assert set(stopped) == {0, 1}
    assert stopped[0] == stopped[1]  # both ranks stopped at the same step
    assert 5 <= stopped[0] < STEPS

    # The replacement pod resumed on both ranks and they ended with the same weights.
    replacement = next(
        p["metadata"]["name"] for p in items(cluster, "pods", namespace, SELECTOR) if p["metadata"]["name"] != evicted
    )
    resumed = [(e["rank"], e["step"]) for e in _events(node_agent, namespace, replacement, "resumed")]
    assert resumed == [(0, stopped[0])]  # rank 0 finds the checkpoint and broadcasts its step to rank 1
    digests = {
        e["rank"]: e["trainableDigest"] for e in _events(node_agent, namespace, replacement, "training_finished")
    }
    assert set(digests) == {0, 1}
    assert digests[0] == digests[1]

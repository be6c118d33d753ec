"""Operator latency: wall time from `kubectl apply` of the tiny job to phase Running and to Succeeded.

Starts its own loopback control plane, SeaweedFS S3 server, test node agent (pods run as local processes)
and the real operator (`dreambooth-operator` subprocess), then runs `examples/minimal-job.yaml` (the tiny
model, 20 steps) `reps` times in fresh namespaces. Writes `bench/results/operator.json`.

Running = the first training step was reported by rank 0's /progress, so apply->Running includes the
operator's reaction, scheduling, process start, model build and data loading. Both times depend mostly on
the machine (a shared 2-core box makes them noisy); the operator's own share is the reconcile duration,
also reported (from its /metrics).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.results_file import write_result

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

POLL_SECONDS = 0.2
TIMEOUT_SECONDS = 900.0


def _images(s3: Any, bucket: str, prefix: str) -> None:
    from PIL import Image

    s3c = s3.client()
    for i in range(4):
        img = Image.new("RGB", (96, 96), (40 * i, 200 - 30 * i, 90))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        s3c.put_object(Bucket=bucket, Key=f"{prefix}img{i}.png", Body=buf.getvalue())


def _one_run(cluster: Any, s3: Any, log_dir: Path, index: int) -> dict[str, Any]:
    from tests.infra.operator import get, running_operator

    namespace = cluster.create_namespace(f"bench-{index}")
    bucket = s3.make_bucket()
    _images(s3, bucket, "subjects/dog/")
    cluster.kubectl(
        "create", "secret", "generic", "s3-credentials", "-n", namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}", f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    )  # fmt: skip
    text = (ROOT / "examples" / "minimal-job.yaml").read_text()
    job = yaml.safe_load(text.replace("dreambooth-examples", bucket).replace("http://s3.example:8333", s3.endpoint))
    with running_operator(cluster, log_dir, [namespace]) as op:
        start = time.monotonic()
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
        times: dict[str, float] = {}
        timeline: list[tuple[float, str, str]] = []  # every (phase, message) change, to show what the wait was
        phase = None
        while time.monotonic() - start < TIMEOUT_SECONDS:
            obj = get(cluster, "dreamboothjob", job["metadata"]["name"], namespace) or {}
            status = obj.get("status") or {}
            phase = status.get("phase")
            elapsed = round(time.monotonic() - start, 2)
            if phase and phase not in times:
                times[phase] = elapsed
            if phase and (not timeline or timeline[-1][1:] != (phase, status.get("message") or "")):
                timeline.append((elapsed, phase, status.get("message") or ""))
            if phase in ("Succeeded", "Failed"):
                break
            time.sleep(POLL_SECONDS)
        metrics = op.metrics_text()
    cluster.delete_namespace(namespace, wait=False)
    reconcile = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("dreambooth_operator_reconcile_duration_seconds_")
        and line.split()[0].endswith(("_sum", "_count"))
    }
    count = reconcile.get("dreambooth_operator_reconcile_duration_seconds_count", 0.0)
    return {
        "finalPhase": phase,
        "phaseFirstSeenSeconds": times,
        "timeline": timeline,
        "applyToRunningSeconds": times.get("Running"),
        "applyToSucceededSeconds": times.get("Succeeded"),
        "podSeconds": (status.get("usage") or {}).get("podSeconds"),
        "gpuSeconds": (status.get("usage") or {}).get("gpuSeconds"),
        "reconciles": count,
        "meanReconcileSeconds": round(reconcile.get("dreambooth_operator_reconcile_duration_seconds_sum", 0.0)
                                      / count, 4) if count else None,
    }  # fmt: skip


def run(results_dir: Path, reps: int = 1) -> dict[str, Any]:
    from nodeagent.config import AgentConfig
    from nodeagent.plugin import NodeAgent

    from tests.infra.controlplane import running_cluster
    from tests.infra.s3 import start_s3

    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        work, logs = Path(tmp) / "work", Path(tmp) / "logs"
        s3 = start_s3(work / "s3", logs)
        try:
            with running_cluster(work / "cluster", logs) as cluster:
                s3.wait_ready(180)
                agent = NodeAgent(
                    AgentConfig(kubeconfig=str(cluster.kubeconfig), state_dir=str(work / "agent"),
                                parent_pid=os.getpid()),
                    logs / "node-agent.log",
                ).start()  # fmt: skip
                try:
                    runs = [_one_run(cluster, s3, logs, i) for i in range(reps)]
                finally:
                    agent.stop()
        finally:
            s3.stop()
    ok = [r for r in runs if r["finalPhase"] == "Succeeded"]
    result: dict[str, Any] = {
        "job": "examples/minimal-job.yaml (tiny model, 20 steps, CPU)",
        "reps": reps,
        "succeeded": len(ok),
        "applyToRunningSecondsMedian": statistics.median(r["applyToRunningSeconds"] for r in ok) if ok else None,
        "applyToSucceededSecondsMedian": statistics.median(r["applyToSucceededSeconds"] for r in ok) if ok else None,
        "gpuSecondsPerSubjectMedian": statistics.median(r["gpuSeconds"] for r in ok) if ok else None,
        "gpuSecondsNote": "status.usage.gpuSeconds: the pod's hold on its node, binding to exit, x gpusPerNode (1); "
        "the node agent's GPU is a fake one, so this is the per-subject pod time of the CPU run",
        "runs": runs,
    }
    return write_result(results_dir, "operator.json", result)


if __name__ == "__main__":
    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))

"""Operator scale: how fast one operator takes in a burst of DreamBoothJobs, and what many active jobs cost it.

Starts its own loopback control plane (etcd, kube-apiserver, controller-manager, scheduler) and the real operator
(`dreambooth-operator` subprocess, default 12 s periodic reconcile), with no node: every pod stays Pending, so
only the control plane's and the operator's work is measured, never training. For each burst size N it applies N
copies of `examples/minimal-job.yaml` in one `kubectl apply` and records:

A warm-up job goes first (its status proves the operator's watch is live) and is left out of the figures (its
reconciles are in the window's, so that the window has N + 1 active jobs).

- `applySeconds`: how long `kubectl apply` itself took to create the N objects (one after another);
- `firstStatusSeconds` (p50/p95/max over the jobs): apply -> the job's first status write (the operator saw it);
- `allChildrenSeconds`: apply -> every job has its batch Job (the last child the operator creates), and
  `lastChildAfterApplySeconds`: how far the operator lags behind the end of the apply;
- over a following idle window with the N jobs active: the operator's CPU (cores, from /proc), its reconciles per
  second and mean reconcile duration (from its /metrics), and its resident memory.

Writes `bench/results/operator_scale.json`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bench.results_file import write_result
from dreambooth_api.constants import GROUP, VERSION

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

BURSTS = (50, 200)
IDLE_WINDOW_SECONDS = 60.0
POLL_SECONDS = 0.1
TIMEOUT_SECONDS = 600.0
WARM_UP = "warm-up"
RECONCILE_INTERVAL_SECONDS = "12"  # the operator's default (settings.reconcile_interval_seconds)


def _jobs(n: int) -> dict[str, Any]:
    job = yaml.safe_load((ROOT / "examples" / "minimal-job.yaml").read_text())
    items = []
    for i in range(n):
        copy = json.loads(json.dumps(job))
        copy["metadata"]["name"] = f"scale-{i:04d}"
        items.append(copy)
    return {"apiVersion": "v1", "kind": "List", "items": items}


def _warm_up(cluster: Any, custom: Any, namespace: str) -> None:
    """One job first, until the operator writes its status: its watch is then live (a just-installed CRD answers
    429 for a moment), so the burst measures the operator, not its start."""
    job = _jobs(1)["items"][0]
    job["metadata"]["name"] = WARM_UP
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        got = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "dreamboothjobs", WARM_UP)
        if (got.get("status") or {}).get("phase"):
            return
        time.sleep(POLL_SECONDS)
    raise TimeoutError("the operator never wrote the warm-up job's status")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _reconciles(metrics: str) -> tuple[float, float]:
    """(count, sum of seconds) of dreambooth_operator_reconcile_duration_seconds."""
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("dreambooth_operator_reconcile_duration_seconds_")
    }
    prefix = "dreambooth_operator_reconcile_duration_seconds"
    return values.get(f"{prefix}_count", 0.0), values.get(f"{prefix}_sum", 0.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def _burst(cluster: Any, log_dir: Path, n: int) -> dict[str, Any]:
    from kubernetes import client

    from tests.infra.operator import running_operator

    api = cluster.api_client()
    custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
    namespace = cluster.create_namespace(f"scale-{n}")
    env = {"DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS": RECONCILE_INTERVAL_SECONDS}
    with running_operator(cluster, log_dir, [namespace], env) as op:
        assert op.process is not None
        pid = op.process.pid
        _warm_up(cluster, custom, namespace)
        start = time.monotonic()
        applied: list[float] = []

        def apply_all() -> None:  # polled while kubectl still creates the later jobs
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_jobs(n)))
            applied.append(round(time.monotonic() - start, 2))

        applier = threading.Thread(target=apply_all, name="apply")
        applier.start()
        first_status: dict[str, float] = {}
        all_children = None
        while time.monotonic() - start < TIMEOUT_SECONDS:
            elapsed = round(time.monotonic() - start, 2)
            listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "dreamboothjobs")
            for job in listed["items"]:
                if (job.get("status") or {}).get("phase") and job["metadata"]["name"] != WARM_UP:
                    first_status.setdefault(job["metadata"]["name"], elapsed)
            children = batch.list_namespaced_job(namespace, limit=n + 2).items
            if len(children) >= n + 1 and len(first_status) >= n:
                all_children = elapsed
                break
            time.sleep(POLL_SECONDS)
        applier.join()
        count0, sum0 = _reconciles(op.metrics_text())
        cpu0, t0 = _cpu_seconds(pid), time.monotonic()
        deadline = t0 + IDLE_WINDOW_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 5.0))  # a measurement window, not a readiness wait
        window = time.monotonic() - t0
        cpu = _cpu_seconds(pid) - cpu0
        count1, sum1 = _reconciles(op.metrics_text())
        rss = _rss_mib(pid)
    cluster.delete_namespace(namespace, wait=False)
    waits = list(first_status.values())
    reconciles = count1 - count0
    return {
        "jobs": n,
        "applySeconds": applied[0] if applied else None,
        "allChildrenSeconds": all_children,
        "lastChildAfterApplySeconds": round(all_children - applied[0], 2) if all_children and applied else None,
        "firstStatusSeconds": {
            "p50": _percentile(waits, 0.5) if waits else None,
            "p95": _percentile(waits, 0.95) if waits else None,
            "max": max(waits) if waits else None,
        },
        "activeWindowSeconds": round(window, 1),
        "operatorCpuCores": round(cpu / window, 3),
        "reconcilesPerSecond": round(reconciles / window, 2),
        "meanReconcileSeconds": round((sum1 - sum0) / reconciles, 4) if reconciles else None,
        "operatorRssMiB": rss,
    }


def run(results_dir: Path, bursts: tuple[int, ...] = BURSTS) -> dict[str, Any]:
    from tests.infra.controlplane import running_cluster

    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-operator-scale-") as tmp:
        work, logs = Path(tmp) / "work", Path(tmp) / "logs"
        with running_cluster(work / "cluster", logs) as cluster:
            runs = [_burst(cluster, logs, n) for n in bursts]
    result: dict[str, Any] = {
        "setup": "one operator, loopback control plane, no nodes (pods stay Pending), reconcile interval "
        f"{RECONCILE_INTERVAL_SECONDS} s; examples/minimal-job.yaml copies applied in one kubectl apply",
        "runs": runs,
    }
    return write_result(results_dir, "operator_scale.json", result)


if __name__ == "__main__":
    print(json.dumps(run(ROOT / "bench" / "results"), indent=2))

"""Operator scale: 1,000 DreamBoothJobs applied at once, what they cost the operator once idle, and how fast a
trainer's progress reaches the job's status with 100 jobs running.

Starts its own loopback control plane (etcd, kube-apiserver, controller-manager, scheduler) and the real operator
(`dreambooth-operator` subprocess, default 12 s periodic check), watching two namespaces. There is one Node object,
tainted so that no pod is scheduled on it by the scheduler, and no kubelet: pods stay Pending unless the benchmark
binds them itself, so only the control plane's and the operator's work is measured, never training.

1. Burst: a warm-up job first (its status proves the operator's watch is live; it is left out of the figures), then
   N copies of `examples/minimal-job.yaml` in one `kubectl apply`. Watches (not lists: a list of 1,000 objects
   every 100 ms would load the API server under test) record when each job and each of its children (batch Job,
   Service, ConfigMap) first appears:
   - `applySeconds`: how long `kubectl apply` itself took to create the N objects (one after another, at the API
     server's write rate);
   - `lastJobCreatedSeconds` / `allChildrenSeconds`: apply start -> the last job seen / every job has all three
     children; `lastChildAfterLastJobSeconds` is the target's figure (how far the operator lags behind the
     creation of the last job), `jobToChildrenSeconds` the per-job latency (p50/p95/max). The batch Job is the
   job's first one: with the pre-flight input check, `<job>-check`, created with the Service and ConfigMap;
   - the operator's CPU seconds over the burst, and its peak RSS (VmHWM) over the whole run.
2. Idle: two windows with the N jobs Pending (their pods cannot be scheduled): one right after the burst, and
   `idle` (the figure), once the burst's backlog is drained (`settleSeconds`: until the passes of a 10 s probe take
   under 0.5 s on average); operator CPU (cores, from /proc), reconciles per second and mean reconcile duration
   (from its /metrics).
3. Status lag: 100 more jobs in the second namespace; the benchmark binds each one's pods to the Node and writes
   their status as a kubelet would (an input check's pod exits 0; the trainer's runs, at a loopback pod IP), and
   one local aiohttp process serves every
   pod's `/progress` on its own address (`127.<k>.0.<i>:8080`, the trainer's port, a subnet claimed as the node
   agent does). Once every job shows step 1, each job's step goes up at its own times; a watch on the jobs
   records when `status.progress.step` shows it, through the operator's real poller. `statusLagSeconds`:
   p50/p95/max of change -> status, and the operator's CPU meanwhile (the N idle jobs are still there).

Writes `bench/results/operator_scale.json` (`python -m bench bench_operator_scale`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.operator_scale_cluster import ProgressServer, create_node, run_pod
from bench.operator_scale_figures import (
    CHILD_KINDS,
    change_schedule,
    children_complete,
    job_list,
    percentiles,
    reconcile_totals,
    settled,
    status_lags,
    window_figures,
)
from bench.results_file import write_result
from dreambooth_api.constants import GROUP, LABEL_JOB_NAME, VERSION

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

JOBS = 1000
RUNNING_JOBS = 100
ACTIVE_WINDOW_SECONDS = 60.0
STEADY_WINDOW_SECONDS = 120.0
SETTLE_PROBE_SECONDS = 10.0
SETTLED_RECONCILE_SECONDS = 0.5
"""The backlog is drained once the passes of a probe interval take under this on average (a pass that queues for
the operator's API threads behind hundreds of others takes minutes)."""
SETTLE_TIMEOUT_SECONDS = 900.0
LAG_ROUNDS = 3
LAG_PERIOD_SECONDS = 30.0
"""Each running job's step goes up LAG_ROUNDS times, LAG_PERIOD_SECONDS apart (longer than any lag: each change is
seen on its own), starting at a random offset within the first period."""
POLL_SECONDS = 0.2
TIMEOUT_SECONDS = 1200.0
LAG_SETUP_SECONDS = 1200.0
WATCH_SECONDS = 60
WARM_UP = "warm-up"
RECONCILE_INTERVAL_SECONDS = "12"  # the operator's default (settings.reconcile_interval_seconds)
SEED = 19
SETUP = (
    "one operator with its default settings (12 s periodic check, idle jobs back off up to 300 s, 16 threads and "
    "16 kept-alive connections for its API calls), loopback control plane on this "
    "machine, one tainted Node without a kubelet (pods stay Pending unless the benchmark binds them); "
    "examples/minimal-job.yaml copies applied in one kubectl apply; the status-lag jobs' /progress served by one "
    "local aiohttp process. Other engineers' tests ran on the same 2 cores at the same time (they share the CPU "
    "with the API server, etcd and the operator): see loadAverageBefore / loadAverage (1, 5, 15 min)."
)


# --- pure parts (tests/unit/bench/test_bench_operator_scale.py) ---------------------------------------------


def _proc_status(pid: int, field_name: str) -> float:
    """A VmRSS / VmHWM line of /proc/<pid>/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _measure(op: Any, pid: int, seconds: float, idle_jobs: int) -> dict[str, Any]:
    count0, sum0 = reconcile_totals(op.metrics_text())
    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    deadline = t0 + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 5.0))  # a measurement window, not a readiness wait
    window = time.monotonic() - t0
    cpu = _cpu_seconds(pid) - cpu0
    count1, sum1 = reconcile_totals(op.metrics_text())
    return window_figures(window, cpu, (count1 - count0, sum1 - sum0), idle_jobs)


def _settle_then_measure(op: Any, pid: int, seconds: float, idle_jobs: int) -> dict[str, Any]:
    """The idle window once the burst's backlog is drained (`settled`; at most SETTLE_TIMEOUT_SECONDS)."""
    start = time.monotonic()
    before = reconcile_totals(op.metrics_text())
    drained = False
    while not drained and time.monotonic() - start < SETTLE_TIMEOUT_SECONDS:
        time.sleep(SETTLE_PROBE_SECONDS)  # one probe interval of the backlog, not a readiness wait
        after = reconcile_totals(op.metrics_text())
        drained, before = settled(before, after, SETTLED_RECONCILE_SECONDS), after
    waited = round(time.monotonic() - start, 1)
    return {"settleSeconds": waited, "settled": drained, **_measure(op, pid, seconds, idle_jobs)}


# --- watches: when each object first appeared, and the jobs' progress -----------------------------------------


@dataclass
class Watched:
    """First-seen times (monotonic) by kind and job name, and each job's status.progress.step over time."""

    start: float = field(default_factory=time.monotonic)
    first: dict[str, dict[str, float]] = field(default_factory=dict)
    steps: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    hooks: dict[str, Callable[[Any], None]] = field(default_factory=dict)
    """Called (in the kind's watch thread) with every object of that kind seen."""

    def saw(self, kind: str, obj: Any) -> None:
        if kind in self.hooks:
            self.hooks[kind](obj)
        now = time.monotonic() - self.start
        meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata.to_dict()
        name = meta["name"] if kind == "DreamBoothJob" else (meta.get("labels") or {}).get(LABEL_JOB_NAME)
        if not name:
            return
        with self.lock:
            self.first.setdefault(kind, {}).setdefault(name, now)
            if kind == "DreamBoothJob":
                step = ((obj.get("status") or {}).get("progress") or {}).get("step")
                history = self.steps.setdefault(name, [])
                if step is not None and (not history or history[-1][1] != step):
                    history.append((now, int(step)))

    def times(self, kind: str) -> dict[str, float]:
        with self.lock:
            return dict(self.first.get(kind, {}))

    def step_history(self) -> dict[str, list[tuple[float, int]]]:
        with self.lock:
            return {k: list(v) for k, v in self.steps.items()}


def _lister(api: Any, namespace: str, kind: str) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """The list function (a real client method: the watch reads its return type from its docstring) and args."""
    from kubernetes import client

    if kind == "DreamBoothJob":
        custom = client.CustomObjectsApi(api)
        return custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, "dreamboothjobs"), {}
    method = {
        "Job": client.BatchV1Api(api).list_namespaced_job,
        "Service": client.CoreV1Api(api).list_namespaced_service,
        "ConfigMap": client.CoreV1Api(api).list_namespaced_config_map,
        "Pod": client.CoreV1Api(api).list_namespaced_pod,
    }[kind]
    return method, (namespace,), {"label_selector": LABEL_JOB_NAME}


def _version(obj: Any) -> str | None:
    version = (
        (obj.get("metadata") or {}).get("resourceVersion") if isinstance(obj, dict) else obj.metadata.resource_version
    )
    return str(version) if version else None


@contextlib.contextmanager
def watching(cluster: Any, namespace: str, watched: Watched, kinds: tuple[str, ...]) -> Iterator[Watched]:
    """Threads (one API client each) that list, then watch, each kind in `namespace` and report every object to
    `watched`; a watch that ends or expires lists again."""
    from kubernetes import watch

    stop = threading.Event()
    watchers: list[Any] = []

    def follow(kind: str) -> None:
        func, args, kwargs = _lister(cluster.api_client(), namespace, kind)
        while not stop.is_set():
            try:
                listed = func(*args, **kwargs)
                items = listed["items"] if isinstance(listed, dict) else listed.items
                version = _version(listed)
                for item in items:
                    watched.saw(kind, item)
                w = watch.Watch()
                watchers.append(w)
                while not stop.is_set():
                    for event in w.stream(
                        func, *args, resource_version=version, timeout_seconds=WATCH_SECONDS, **kwargs
                    ):
                        if event["type"] == "ERROR":
                            raise RuntimeError(str(event["raw_object"]))
                        watched.saw(kind, event["object"])
                        version = _version(event["object"]) or version
                        if stop.is_set():
                            return
            except Exception:
                time.sleep(POLL_SECONDS)

    threads = [threading.Thread(target=follow, args=(kind,), name=f"watch-{kind}", daemon=True) for kind in kinds]
    for thread in threads:
        thread.start()
    try:
        yield watched
    finally:
        stop.set()
        for w in watchers:
            w.stop()


def _wait(what: str, check: Callable[[], Any], timeout: float = TIMEOUT_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"timed out waiting for {what}")


# --- the fake /progress endpoints ---------------------------------------------------------------------------


def _template() -> dict[str, Any]:
    template: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "minimal-job.yaml").read_text())
    return template


def _warm_up(cluster: Any, custom: Any, namespace: str) -> None:
    """One job first, until the operator writes its status: its watch is then live (a just-installed CRD answers
    429 for a moment), so the burst measures the operator, not its start."""
    job = job_list(1, WARM_UP, _template())["items"][0]
    job["metadata"]["name"] = WARM_UP
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))

    def has_status() -> bool:
        got = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "dreamboothjobs", WARM_UP)
        return bool((got.get("status") or {}).get("phase"))

    _wait("the warm-up job's status", has_status)


def _burst(cluster: Any, pid: int, namespace: str, n: int) -> dict[str, Any]:
    jobs = [item["metadata"]["name"] for item in job_list(n, "scale", _template())["items"]]
    body = json.dumps(job_list(n, "scale", _template()))
    with watching(cluster, namespace, Watched(), ("DreamBoothJob", *CHILD_KINDS)) as watched:
        # The watches list first: wait until they see the warm-up job's children, so that they are live.
        _wait("the watches", lambda: all(watched.times(kind).get(WARM_UP) is not None for kind in CHILD_KINDS))
        cpu0 = _cpu_seconds(pid)
        watched.start = start = time.monotonic()
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=body, timeout=TIMEOUT_SECONDS)
        applied = time.monotonic() - start
        done = _wait(
            "every job's children",
            lambda: children_complete({k: watched.times(k) for k in CHILD_KINDS}, jobs),
        )
        cpu = _cpu_seconds(pid) - cpu0
        created = {name: t for name, t in watched.times("DreamBoothJob").items() if name in done}
    last_created = max(created.values())
    all_children = max(done.values())
    return {
        "jobs": n,
        "applySeconds": round(applied, 2),
        "lastJobCreatedSeconds": round(last_created, 2),
        "allChildrenSeconds": round(all_children, 2),
        "lastChildAfterLastJobSeconds": round(all_children - last_created, 2),
        "lastChildAfterApplySeconds": round(all_children - applied, 2),
        "jobToChildrenSeconds": percentiles([done[j] - created[j] for j in done if j in created]),
        "operatorCpuSeconds": round(cpu, 2),
        "operatorRssMiBAfterBurst": _proc_status(pid, "VmRSS"),
    }


def _status_lag(cluster: Any, op: Any, pid: int, namespace: str, n: int, idle_jobs: int) -> dict[str, Any]:
    from kubernetes import client

    from tests.nodeagent.ipalloc import IPAllocator, claim_subnet

    api = cluster.api_client()
    core = client.CoreV1Api(api)
    jobs = [item["metadata"]["name"] for item in job_list(n, "lag", _template())["items"]]
    claim = claim_subnet()
    server = ProgressServer()
    try:
        allocator = IPAllocator(claim.second_octet)
        ips = {job: allocator.allocate() for job in jobs}
        server.steps.update(dict.fromkeys(ips.values(), 1))
        server.start(list(ips.values()))
        started: set[str] = set()  # jobs whose trainer pod runs
        handled: set[str] = set()  # pods, by uid

        def kubelet(pod: Any) -> None:
            """The node's side, from the pod watch (no polling): each new pod is bound and its status written."""
            job = str((pod.metadata.labels or {}).get(LABEL_JOB_NAME))
            if pod.metadata.uid in handled or job not in ips or pod.spec.node_name or pod.metadata.deletion_timestamp:
                return
            handled.add(pod.metadata.uid)
            if run_pod(core, pod, ips[job]):
                started.add(job)

        with watching(cluster, namespace, Watched(hooks={"Pod": kubelet}), ("DreamBoothJob", "Pod")) as watched:
            body = json.dumps(job_list(n, "lag", _template()))
            # As long as it takes: at the API server's write rate on a busy machine, 100 creates took over 120 s.
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=body, timeout=LAG_SETUP_SECONDS)
            _wait("the lag jobs' trainer pods to run", lambda: len(started) == n, LAG_SETUP_SECONDS)
            _wait("step 1 in every lag job's status", lambda: len(watched.step_history()) == n, LAG_SETUP_SECONDS)
            changes = change_schedule(jobs, LAG_ROUNDS, LAG_PERIOD_SECONDS, SEED)
            cpu0, t0 = _cpu_seconds(pid), time.monotonic()
            count0, sum0 = reconcile_totals(op.metrics_text())
            made: list[tuple[float, str, int]] = []
            for at, job, step in changes:
                while (left := t0 + at - time.monotonic()) > 0:
                    time.sleep(min(left, 0.05))  # the change's own time, not a readiness wait
                server.steps[ips[job]] = step
                made.append((time.monotonic() - watched.start, job, step))
            last = {job: step for _, job, step in made}

            def all_seen() -> bool:
                history = watched.step_history()
                return all(history.get(job) and history[job][-1][1] >= step for job, step in last.items())

            _wait("the last progress change in every status", all_seen, timeout=120.0)
            window = time.monotonic() - t0
            cpu = _cpu_seconds(pid) - cpu0
            count1, sum1 = reconcile_totals(op.metrics_text())
            lags = status_lags(made, watched.step_history())
    finally:
        server.close()
        claim.close()
    figures = window_figures(window, cpu, (count1 - count0, sum1 - sum0), idle_jobs)
    figures.pop("jobs")
    return {
        "runningJobs": n,
        "idleJobsAlongside": idle_jobs,
        "changes": len(made),
        "changesSeen": len(lags),
        "statusLagSeconds": percentiles(lags),
        "progressRequests": server.requests,
        **figures,
    }


def run(results_dir: Path, n: int = JOBS, running: int = RUNNING_JOBS) -> dict[str, Any]:
    from kubernetes import client

    from tests.infra.controlplane import running_cluster
    from tests.infra.operator import running_operator

    results_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"setup": SETUP, "loadAverageBefore": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="bench-operator-scale-") as tmp:
        work, logs = Path(tmp) / "work", Path(tmp) / "logs"
        with running_cluster(work / "cluster", logs) as cluster:
            api = cluster.api_client()
            create_node(client.CoreV1Api(api))
            scale, lag = cluster.create_namespace("scale"), cluster.create_namespace("lag")
            env = {"DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS": RECONCILE_INTERVAL_SECONDS}
            with running_operator(cluster, logs, [scale, lag], env) as op:
                assert op.process is not None
                pid = op.process.pid
                _warm_up(cluster, client.CustomObjectsApi(api), scale)
                phases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                    ("burst", lambda: _burst(cluster, pid, scale, n)),
                    ("idleRightAfterBurst", lambda: _measure(op, pid, ACTIVE_WINDOW_SECONDS, n + 1)),
                    ("idle", lambda: _settle_then_measure(op, pid, STEADY_WINDOW_SECONDS, n + 1)),
                    ("statusLag", lambda: _status_lag(cluster, op, pid, lag, running, n + 1)),
                ]
                for name, measure in phases:
                    try:
                        result[name] = measure()
                    except Exception as err:  # what was measured before stays in the file
                        result[name] = {"error": repr(err)}
                    result["operatorPeakRssMiB"] = _proc_status(pid, "VmHWM")
                    result["operatorRssMiB"] = _proc_status(pid, "VmRSS")
                    write_result(results_dir, "operator_scale.json", result)
    return write_result(results_dir, "operator_scale.json", result)


if __name__ == "__main__":
    print(json.dumps(run(ROOT / "bench" / "results"), indent=2))

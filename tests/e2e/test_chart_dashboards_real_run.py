"""End to end: a real Prometheus scrapes the real operator and the trainer pods of real jobs (the node agent runs
them): the pods through the chart's own PodMonitor, translated as the Prometheus Operator does
(tests/infra/podmonitor.py: its selector, ports, honorLabels and the namespace/pod labels), the operator (a process
here, not a pod) by a static target with honor_labels, as its ServiceMonitor would; and it loads the chart's own
training and operator alerts (files/alerts.yaml, shortened by tests/alert_rules.py). One run proves two things:

1. every query of the Fleet and Job dashboards returns data from the run;
2. each training and operator alert fires because of something the run really did, and names the job that did it.

The run (one operator watching two namespaces, all jobs on the tiny model):

- `minimal` (the healthy job): evicted once after a checkpoint (the restart panels; a preemption), resumes,
  succeeds and is evaluated with the tiny metric models (the evaluation panels): DreamBoothPreemptionStorm,
  DreamBoothEvaluationScoreLow;
- `no-photos-1..3`: no photos under their prefix, so the input check fails them (InvalidInput): the failure panels,
  DreamBoothJobsFailing;
- `stalled`: two ranks in one pod (gpusPerNode 2), whose storage endpoint is a proxy that refuses every write under
  its checkpoint prefix (403 AccessDenied, as a bucket policy would): DreamBoothCheckpointUploadsFailing. Once a
  checkpoint failed, its rank-1 process is SIGSTOPped, so rank 0 waits in its all-reduce with its metrics server
  still answering (what a hung NCCL peer looks like): DreamBoothTrainingStalled;
- `over-quota`, in a second namespace whose ResourceQuota allows no batch Job: every create of its input check is
  refused (403 exceeded quota), so each reconcile fails (DreamBoothOperatorReconcileErrors) and it stays Pending;
  DreamBoothJobsStuckPending is asserted firing at a moment when it is the only Pending job (every other job is past
  Pending) and no job started within the window. (The test control plane runs no resourcequota controller, so the
  test writes the quota's status, nothing used, as the controller would: the API server's admission does the rest.)
- at the end the operator stops: DreamBoothOperatorDown.

The short-run decisions (tests/alert_rules.py): windows and `for` shortened alike for every alert (RANGES, HOLDS).
A `for` is kept (short), not dropped, because a short window alone makes the stall expression hold for a moment
whenever a healthy trainer enters Training before its first step, where the chart's `for: 15m` waits; every alert is
asserted firing, not just pending (TrainingStalled is pending for a moment for the healthy job at its pods' first
steps, and must never fire for it). Thresholds are the chart's except those the run cannot reach (THRESHOLDS, each
with its reason): more than 10 preemptions (> 0), and a mean DINO under 0.5 (the tiny random DINO model scores about
0.9 whatever the images: < 1). The run makes exactly what each alert needs (3 failures for ">= 3", one eviction for
"> 0", one evaluation for the mean score): the operator creates its labelled series at zero when it starts, so
`increase()` counts the first event too (this test found that they were born at their first event, and missed it).

Gauges of a trainer are there only while its pod runs, so each dashboard query is evaluated at the last moment the
healthy trainer was seen training, and now (for what the operator observes at the end of a job); it passes when
either answers. NEEDS_ANOTHER_RUN lists the targets that need a run this test does not make (none now)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from dreambooth_api.constants import GROUP, JOB_PLURAL, VERSION
from tests.alert_rules import fired_all, write_short_run_rules
from tests.chart_queries import exported_metric_names, metric_names, panel_queries, substitute, variable_selectors
from tests.e2e.test_operator_training import TRAIN_TIMEOUT, credentials_secret, example, phase, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.faultproxy import FaultProxy
from tests.infra.fixtures import PrometheusFactory
from tests.infra.operator import OperatorProcess, apply, running_operator, wait_for
from tests.infra.podmonitor import chart_pod_monitor, pod_monitor_scrape_configs, write_targets
from tests.infra.processes import NotReadyError
from tests.infra.prometheus import PrometheusServer, Sample
from tests.infra.s3 import S3Server

STEPS = 120
EVICTIONS = 1
"""Preemptions of the healthy job: DreamBoothPreemptionStorm's "> 0" (module docstring)."""
FAILING = 3
"""Jobs failed for InvalidInput: DreamBoothJobsFailing's ">= 3"."""
# (dashboard, panel title, target index) whose data needs a run this test does not make, each with why.
NEEDS_ANOTHER_RUN: dict[tuple[str, str, int], str] = {}
# The cheapest evaluation: one prompt, one image of 2 steps, the tiny DINO and CLIP models, no baseline or judge.
EVALUATION = {
    "enabled": True,
    "prompts": ["a {} on the beach"],
    "imagesPerPrompt": 1,
    "numInferenceSteps": 2,
    "baseline": False,
    "dinoModel": {"tiny": True},
    "clipModel": {"tiny": True},
}
TRAINING_ALERTS = (
    "DreamBoothJobsFailing",
    "DreamBoothJobsStuckPending",
    "DreamBoothPreemptionStorm",
    "DreamBoothOperatorReconcileErrors",
    "DreamBoothCheckpointUploadsFailing",
    "DreamBoothTrainingStalled",
    "DreamBoothEvaluationScoreLow",
)
ALERTS = (*TRAINING_ALERTS, "DreamBoothOperatorDown")
# Windows: each long enough to hold what the run does in it, short enough to pass within the run. TrainingStalled
# holds after 15m -> 20 s without a step plus its `for` (15m -> 10 s); a healthy tiny trainer steps every second or so.
RANGES = {"1h": "3m", "30m": "30s", "15m": "20s", "10m": "1m", "6h": "10m"}
# OperatorDown's `for` (5m -> 10 s) outlasts the moments before Prometheus's first scrape of the operator on a loaded
# machine (3 s did not: the operator was absent that long at the start of a run).
HOLDS = {"5m": "10s", "10m": "3s", "15m": "10s", "30m": "5s"}
THRESHOLDS = {
    # Eleven preemptions in 15 minutes take eleven restarts of a trainer: minutes of CPU on this machine.
    "DreamBoothPreemptionStorm": {"> 10": "> 0"},
    # The tiny random DINO model finds any two images alike (0.906 for this run's sample against its photos): the
    # number says nothing about fidelity, and the chart's 0.5 cannot be reached; under 1 keeps the expression (the
    # mean of the increases, by metric) and holds for any re-evaluation that is not a copy of the photos.
    "DreamBoothEvaluationScoreLow": {"< 0.5": "< 1"},
}
STALL_TIMEOUT = 240.0


@pytest.fixture
def quota_namespace(cluster: Cluster) -> Iterator[str]:
    """A second namespace whose ResourceQuota allows no batch Job: the operator's creates there are refused."""
    name = cluster.create_namespace("t-over-quota")
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-batch-jobs"},
        "spec": {"hard": {"count/jobs.batch": "0"}},
    }
    apply(cluster, quota, name)
    # The test control plane runs no resourcequota controller (tests/infra/controlplane.py CONTROLLERS), so the
    # status it would compute (nothing used: no batch Job in the namespace) is written here; the API server's quota
    # admission then refuses every batch Job as exceeding it, as in a cluster.
    status = {"status": {"hard": {"count/jobs.batch": "0"}, "used": {"count/jobs.batch": "0"}}}
    cluster.kubectl(
        "patch",
        "resourcequota",
        "no-batch-jobs",
        "-n",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    yield name
    cluster.delete_namespace(name, wait=False)


@pytest.fixture
def fast_op(
    cluster: Cluster, namespace: str, quota_namespace: str, infra_log_dir: Path, node_agent: Any
) -> Iterator[OperatorProcess]:
    env = {"DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS": "1"}
    with running_operator(cluster, infra_log_dir, [namespace, quota_namespace], env) as operator:
        yield operator


def _query_at(prom: PrometheusServer, expr: str, when: float | None) -> list[Sample]:
    params = {"query": expr} if when is None else {"query": expr, "time": f"{when:.3f}"}
    data = prom.api("query", **params)
    result = data["result"]
    return [{"metric": {}, "value": result}] if data["resultType"] in ("scalar", "string") else list(result)


def _targets() -> list[tuple[str, str, int, str]]:
    """(dashboard, title, target index, expr) of the Fleet and Job dashboards."""
    out: list[tuple[str, str, int, str]] = []
    seen: dict[tuple[str, str], int] = {}
    for dashboard, title, expr in panel_queries():
        index = seen.get((dashboard, title), 0)
        seen[(dashboard, title)] = index + 1
        if dashboard in ("fleet", "job"):
            out.append((dashboard, title, index, expr))
    return out


def _expr(dashboard: str, title: str) -> str:
    (expr,) = [e for d, t, _, e in _targets() if (d, t) == (dashboard, title)]
    return expr


def _value(prom: PrometheusServer, expr: str) -> float | None:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else None


def _pod_processes(node_agent: Any, namespace: str, pod: str) -> list[tuple[int, str, str | None]]:
    """(pid, state, LOCAL_RANK) of the pod's processes; LOCAL_RANK is in the environment of each rank the trainer's
    local-rank supervisor starts."""
    found = []
    for pid in node_agent.pids(namespace, pod):
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((v.removeprefix(b"LOCAL_RANK=").decode() for v in env if v.startswith(b"LOCAL_RANK=")), None)
            found.append((pid, state, rank))
    return found


def _ever_fired(prom: PrometheusServer) -> set[str]:
    """The alerts that were firing at some moment of the run."""
    found = prom.query('count by (alertname) (max_over_time(ALERTS{alertstate="firing"}[1h]))')
    return {s["metric"]["alertname"] for s in found}


def test_fleet_and_job_panels_and_training_alerts_answer_from_a_real_run(
    cluster: Cluster,
    namespace: str,
    quota_namespace: str,
    s3: S3Server,
    fast_op: OperatorProcess,
    node_agent: Any,
    prometheus: PrometheusFactory,
    tmp_path: Path,
) -> None:
    rules = write_short_run_rules(tmp_path / "alerts.yaml", ALERTS, RANGES, THRESHOLDS, HOLDS)
    # The trainer pods through the chart's own PodMonitor, translated as the Prometheus Operator does
    # (tests/infra/podmonitor.py); their targets written as the pods appear (what its pod discovery does).
    monitor = chart_pod_monitor()
    targets_file = tmp_path / "pod-targets.json"
    targets_file.write_text("[]")
    prom = prometheus(
        scrape_configs=[
            {
                "job_name": "operator",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{fast_op.metrics_port}"]}],
            },
            *pod_monitor_scrape_configs(monitor, targets_file),
        ],
        rule_files=[rules],
    )
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    credentials_secret(cluster, s3, quota_namespace)

    job = example(s3, bucket)
    job["spec"]["training"].update({"maxSteps": STEPS, "checkpoint": {"intervalSteps": 10, "intervalSeconds": None}})
    job["spec"]["evaluation"] = EVALUATION
    name = job["metadata"]["name"]

    def failing_job(index: int) -> dict[str, Any]:
        failing = example(s3, bucket)
        failing["metadata"]["name"] = f"no-photos-{index}"
        failing["spec"]["instanceImages"]["uri"] = f"s3://{bucket}/subjects/nobody/"
        return failing

    proxy = FaultProxy(s3.endpoint, deny_writes_under=f"/{bucket}/models/stalled/checkpoints/")
    proxy.start()
    stalled = example(s3, bucket)
    stalled["metadata"]["name"] = "stalled"
    stalled["spec"]["resources"] = {"gpusPerNode": 2}
    stalled["spec"]["training"].update({"maxSteps": 1000, "checkpoint": {"intervalSteps": 2, "intervalSeconds": None}})
    stalled["spec"]["output"]["uri"] = f"s3://{bucket}/models/stalled/"
    stalled["spec"]["storage"]["endpoint"] = proxy.endpoint
    stalled["spec"]["runPolicy"] = {"preflight": False}  # the input check would only cost CPU here

    over_quota = example(s3, bucket)
    over_quota["metadata"]["name"] = "over-quota"
    over_quota["spec"]["output"]["uri"] = f"s3://{bucket}/models/over-quota/"

    for manifest in (job, *(failing_job(i) for i in range(1, FAILING + 1)), stalled):
        apply(cluster, manifest, namespace)
    apply(cluster, over_quota, quota_namespace)

    selector = f'namespace="{namespace}", job="{name}", rank="0"'
    stalled_selector = f'namespace="{namespace}", job="stalled", rank="0"'
    seen_training: list[float] = []
    scraped_pods: dict[str, str] = {}
    evicted: list[str] = []
    stopped_pids: list[int] = []
    stopped_at_step: list[float] = []
    stuck_alone: list[float] = []
    stall_misses: list[str] = []
    with cluster.api_client() as api:
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)

        def scrape_new_pods(pods: list[dict[str, Any]]) -> None:
            """Discovery: the targets file follows the pods (a new IP, a phase change, a pod gone)."""
            status = {p["metadata"]["name"]: p.get("status") or {} for p in pods}
            now = {name: f"{st.get('podIP')} {st.get('phase')}" for name, st in status.items() if st.get("podIP")}
            if now != scraped_pods:
                scraped_pods.clear()
                scraped_pods.update(now)
                write_targets(pods, monitor, targets_file)

        def evict_after_checkpoints(dbj: dict[str, Any] | None, pods: list[dict[str, Any]]) -> None:
            """The restarts: the trainer pod evicted (a preemption) once it has a checkpoint (a newer one each time);
            the job resumes from it."""
            checkpoint = (((dbj or {}).get("status") or {}).get("lastCheckpoint") or {}).get("step") or 0
            running = [
                p
                for p in pods
                if (p.get("status") or {}).get("phase") == "Running"
                and not p["metadata"].get("deletionTimestamp")
                and p["metadata"]["name"] not in evicted
            ]
            due = len(evicted) < EVICTIONS and checkpoint >= 10 * (len(evicted) + 1)
            if not due or phase(dbj) != "Running" or len(running) != 1:
                return
            pod = running[0]["metadata"]["name"]
            eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=namespace))
            core.create_namespaced_pod_eviction(pod, namespace, eviction)
            evicted.append(pod)

        def stall_after_a_failed_checkpoint(pods: list[dict[str, Any]]) -> None:
            """Once a checkpoint upload of the running `stalled` pod failed, SIGSTOP its rank-1 process: rank 0
            waits for it."""
            running = [p["metadata"]["name"] for p in pods if (p.get("status") or {}).get("phase") == "Running"]
            if stopped_pids or len(running) != 1:
                return  # not yet, or the listing lags: at the next poll
            (pod,) = running
            # This pod's own failures: a series of an earlier pod (Prometheus keeps it for a while) says nothing
            # about this one's ranks.
            if not _value(
                prom, f'dreambooth_trainer_checkpoint_upload_failures_total{{{stalled_selector}, pod="{pod}"}}'
            ):
                return
            processes = _pod_processes(node_agent, namespace, pod)
            pids = [pid for pid, _, rank in processes if rank == "1"]
            if not pids:
                # Listed Running but its ranks are gone (the agent reports an exit at its next sync): kept for the
                # failure message, and the next poll looks again.
                stall_misses.append(f"{pod}: {processes}")
                return
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            stopped_pids.extend(pids)
            stopped_at_step.append(_value(prom, f"dreambooth_trainer_step{{{stalled_selector}}}") or 0.0)

        def jobs() -> dict[str, dict[str, Any]]:
            listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, JOB_PLURAL)
            return {j["metadata"]["name"]: j for j in listed["items"]}

        def pods_of(job_name: str, all_pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [p for p in all_pods if p["metadata"]["labels"].get("dreambooth.dev/job-name") == job_name]

        def fetch() -> dict[str, Any]:
            listed = core.list_namespaced_pod(namespace, label_selector="dreambooth.dev/component=trainer")
            all_pods: list[dict[str, Any]] = [api.sanitize_for_serialization(p) for p in listed.items]  # as kubectl's
            scrape_new_pods(all_pods)
            training = prom.query(
                f'dreambooth_trainer_phase{{{selector}, phase="Training"}} == 1 '
                f"and on (namespace, job) dreambooth_trainer_steps_per_second{{{selector}}} > 0"
            )
            if training:
                seen_training.append(time.time())
            dbjs = jobs()
            evict_after_checkpoints(dbjs.get(name), pods_of(name, all_pods))
            stall_after_a_failed_checkpoint(pods_of("stalled", all_pods))
            # StuckPending holds for over-quota alone: every job of this namespace is past Pending, one job is Pending.
            stuck = prom.query('ALERTS{alertname="DreamBoothJobsStuckPending", alertstate="firing"}')
            past_pending = all(phase(j) not in (None, "Pending") for j in dbjs.values())
            if stuck and past_pending and _value(prom, 'sum(dreambooth_operator_jobs{phase="Pending"})') == 1:
                stuck_alone.append(time.time())
            return {"firing": _ever_fired(prom), "stall_misses": stall_misses[-3:], "jobs": dbjs}

        def done(state: dict[str, Any]) -> bool:
            dbjs = state["jobs"]
            healthy = dbjs.get(name) or {}
            if phase(healthy) == "Failed":
                return True  # fails below, with its status
            failed = [n for n in dbjs if n.startswith("no-photos-") and phase(dbjs[n]) == "Failed"]
            alerts = set(TRAINING_ALERTS) <= state["firing"] and bool(stuck_alone)
            return phase(healthy) == "Succeeded" and len(failed) == FAILING and alerts

        def diagnosis() -> str:
            """What was missing, and what the stalled pod's processes were doing: appended at the end of a timeout's
            message, where a CI log's tail shows it."""
            firing = _ever_fired(prom)
            failures = f"dreambooth_trainer_checkpoint_upload_failures_total{{{stalled_selector}}}"
            lines = [
                f"missing alerts: {sorted(set(TRAINING_ALERTS) - firing)}; StuckPending alone: {bool(stuck_alone)}; "
                f"rank 1 stopped: {stopped_pids}; polls without rank 1: {len(stall_misses)}",
                f"stalled's upload failures: {prom.query(failures)}",
            ]
            listed = core.list_namespaced_pod(namespace, label_selector="dreambooth.dev/job-name=stalled").items
            for pod in listed:
                pod_name = pod.metadata.name
                lines.append(
                    f"pod {pod_name} {pod.status.phase}: processes {_pod_processes(node_agent, namespace, pod_name)}"
                )
                lines.append(node_agent.logs(namespace, pod_name, tail_lines=15))
            return "\n".join(lines)

        try:
            try:
                state = wait_for("the run's alerts", fetch, done, TRAIN_TIMEOUT + STALL_TIMEOUT, fast_op)
            except NotReadyError as err:
                raise AssertionError(f"{err}\n--- diagnosis ---\n{diagnosis()}") from None
            dbj = state["jobs"][name]
            assert phase(dbj) == "Succeeded", json.dumps(dbj["status"], indent=1)
            assert len(evicted) == EVICTIONS, f"the trainer was evicted {len(evicted)} times"
            assert dbj["status"]["restarts"]["preemptions"] == EVICTIONS, dbj["status"]["restarts"]
            assert set(dbj["status"]["outputs"]["evaluation"]) >= {"dino", "clipI", "clipT"}, dbj["status"]["outputs"]
            assert seen_training, f"Prometheus never saw {name} training (targets {scraped_pods}, {prom.targets()})"
            trained_at = seen_training[-1]

            _assert_panels(prom, namespace, name, trained_at)
            assert stuck_alone, "DreamBoothJobsStuckPending never fired while over-quota was the only Pending job"
            _assert_alerts(prom, namespace, name, fast_op, proxy, stopped_at_step)
        finally:
            for pid in stopped_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            # Their pods and finalizers go while the operator runs; nothing keeps running after the test.
            cluster.kubectl("delete", "dreamboothjob", "stalled", "-n", namespace, "--ignore-not-found", "--wait=false")
            cluster.kubectl(
                "delete", "dreamboothjob", "over-quota", "-n", quota_namespace, "--ignore-not-found", "--timeout=60s"
            )
            proxy.stop()

        # Last: the operator stops, and nothing scrapes it any more.
        wait_for(
            "stalled's pods gone",
            lambda: core.list_namespaced_pod(namespace, label_selector="dreambooth.dev/job-name=stalled").items,
            lambda pods: not pods,
            120,
            fast_op,
        )
        fast_op.stop()
        stopped = time.time()
        prom.wait_for('ALERTS{alertname="DreamBoothOperatorDown", alertstate="firing"}', timeout=60)
        assert fired_all(prom, "DreamBoothOperatorDown", f"{int(time.time() - stopped) + 1}s", "firing")


def _assert_panels(prom: PrometheusServer, namespace: str, name: str, trained_at: float) -> None:
    """Every Fleet and Job panel answers, with this run's values: its steps, its restarts (two trainer processes
    of rank 0; an eviction is a preemption), the scores it was evaluated with."""
    variables = {"namespace": namespace, "job": name}
    ranges = {"__range": "15m", "__rate_interval": "1m"}
    silent: list[str] = []
    for dashboard, title, index, expr in _targets():
        if not metric_names(expr) <= exported_metric_names():
            continue  # pending names (tests/chart_queries.PENDING_METRICS): the integration test lists them
        if (dashboard, title, index) in NEEDS_ANOTHER_RUN:
            continue
        promql = substitute(expr, {**ranges, **variables})
        if not (_query_at(prom, promql, trained_at) or _query_at(prom, promql, None)):
            silent.append(f"{dashboard} / {title} [{index}]: {promql}")
    assert not silent, "panels with no data from the run:\n" + "\n".join(silent)
    for dashboard, variable, query in variable_selectors():
        if dashboard in ("fleet", "job"):
            values = _query_at(prom, f"count by ({variable}) ({substitute(query, variables)})", trained_at)
            assert variables[variable] in {s["metric"].get(variable) for s in values}, (dashboard, variable)
    selector = f'namespace="{namespace}", job="{name}", rank="0"'
    (steps,) = _query_at(prom, f"max(dreambooth_trainer_total_steps{{{selector}}})", trained_at)
    assert float(steps["value"][1]) == STEPS
    (restarts,) = _query_at(
        prom, substitute(_expr("job", "Restarts (trainer processes in range)"), {**ranges, **variables}), None
    )
    assert float(restarts["value"][1]) == EVICTIONS, restarts
    by_reason = _query_at(prom, "sum by (reason) (dreambooth_operator_restarts_total)", None)
    counted = {s["metric"].get("reason"): float(s["value"][1]) for s in by_reason}
    assert {reason: n for reason, n in counted.items() if n} == {"preemption": EVICTIONS}, by_reason
    scores = _query_at(prom, "sum by (metric) (dreambooth_operator_evaluation_score_count)", None)
    observed = {s["metric"]["metric"] for s in scores if float(s["value"][1]) > 0}  # every name exists at 0
    assert observed >= {"dino", "clipI", "clipT"}, scores
    warnings = _query_at(prom, 'dreambooth_operator_events_total{type="Warning"}', None)
    assert warnings, "the failed jobs emitted no Warning event"


def _assert_alerts(
    prom: PrometheusServer,
    namespace: str,
    name: str,
    op: OperatorProcess,
    proxy: FaultProxy,
    stopped_at_step: list[float],
) -> None:
    """Each training alert fired, for the job that made it hold, and never for the healthy job."""
    labels = {alert: fired_all(prom, alert, state="firing") for alert in TRAINING_ALERTS}
    assert all(labels.values()), {alert: found for alert, found in labels.items() if not found}
    # Per job: the stalled job, and only it, stalled and failed to write checkpoints.
    for alert in ("DreamBoothCheckpointUploadsFailing", "DreamBoothTrainingStalled"):
        assert {(s["namespace"], s["job"]) for s in labels[alert]} == {(namespace, "stalled")}, (alert, labels[alert])
    pending_for_healthy = [
        s for s in fired_all(prom, "DreamBoothTrainingStalled") if s.get("job") == name
    ]  # a moment without a step (under the short `for`) may make it pending; never firing
    print(f"TrainingStalled pending for {name}: {pending_for_healthy}")
    assert proxy.injected["denied"] > 0, proxy
    (stalled_at,) = stopped_at_step
    final = _value(
        prom, f'max_over_time(dreambooth_trainer_step{{namespace="{namespace}", job="stalled", rank="0"}}[10m])'
    )
    assert final is not None, "the stalled job's rank 0 was never scraped"
    # No step after rank 1 stopped but the one in flight (rank 1 may have sent its share), plus one for the scrape
    # that `stalled_at` (Prometheus's value when the test stopped it) may lag behind.
    assert 0 < final <= stalled_at + 2, (stalled_at, final)
    # The mean DINO score of the run's one evaluation.
    (dino,) = labels["DreamBoothEvaluationScoreLow"]
    assert dino["metric"] == "dino", labels["DreamBoothEvaluationScoreLow"]
    # The over-quota job's input check could not be created: the reconcile errors are the quota's.
    log = "\n".join(path.read_text(errors="replace") for path in op.logs)
    assert "no-batch-jobs" in log, op.log_tail()  # the ResourceQuota's name, in the API server's 403

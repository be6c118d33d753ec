"""End to end: a real Prometheus scrapes the real operator and the trainer pods of a real job (the node agent runs
them), the way the chart's ServiceMonitor and PodMonitor would (honor_labels; each pod found by its labels and IP), and
every query of the Fleet and Job dashboards returns data from that run: a job that is evicted once after a checkpoint
(the restart panels), resumes, succeeds and is evaluated on the tiny metric models (the evaluation panels), and one
made to fail (InvalidInput: no photos) for the failure panels.

Gauges of a trainer are there only while its pod runs, so each query is evaluated at the last moment the trainer was
seen training, and now (after both jobs ended, for what the operator observes at the end of a job); it passes when
either answers. NEEDS_ANOTHER_RUN lists the targets that need a run this test does not make (none now)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.chart_queries import exported_metric_names, metric_names, panel_queries, substitute, variable_selectors
from tests.e2e.test_operator_training import TRAIN_TIMEOUT, credentials_secret, example, phase, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.fixtures import PrometheusFactory
from tests.infra.operator import OperatorProcess, apply, get, items, running_operator, wait_for
from tests.infra.prometheus import PrometheusServer, Sample
from tests.infra.s3 import S3Server

STEPS = 120
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


@pytest.fixture
def fast_op(cluster: Cluster, namespace: str, infra_log_dir: Path, node_agent: Any) -> Iterator[OperatorProcess]:
    env = {"DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS": "1"}
    with running_operator(cluster, infra_log_dir, [namespace], env) as operator:
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


def test_fleet_and_job_panels_answer_from_a_real_run(
    cluster: Cluster,
    namespace: str,
    s3: S3Server,
    fast_op: OperatorProcess,
    prometheus: PrometheusFactory,
    tmp_path: Path,
) -> None:
    # The trainer pods' targets, written as the pods appear (what the PodMonitor's pod discovery does).
    targets_file = tmp_path / "trainer-targets.json"
    targets_file.write_text("[]")
    prom = prometheus(
        scrape_configs=[
            {
                "job_name": "operator",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{fast_op.metrics_port}"]}],
            },
            {
                "job_name": "workloads",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
            },
        ]
    )
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    job = example(s3, bucket)
    job["spec"]["training"].update({"maxSteps": STEPS, "checkpoint": {"intervalSteps": 10, "intervalSeconds": None}})
    job["spec"]["evaluation"] = EVALUATION
    name = job["metadata"]["name"]
    apply(cluster, job, namespace)

    selector = f'namespace="{namespace}", job="{name}", rank="0"'
    seen_training: list[float] = []
    scraped_pods: dict[str, str] = {}
    evicted: list[str] = []

    def evict_once_after_a_checkpoint(dbj: dict[str, Any] | None, pods: list[dict[str, Any]]) -> None:
        """The restart: the trainer pod evicted (a preemption) once it has a checkpoint; the job resumes from it."""
        checkpoint = (((dbj or {}).get("status") or {}).get("lastCheckpoint") or {}).get("step") or 0
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        if evicted or phase(dbj) != "Running" or checkpoint < 10 or len(running) != 1:
            return
        pod = running[0]["metadata"]["name"]
        with cluster.api_client() as api:
            eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=namespace))
            client.CoreV1Api(api).create_namespaced_pod_eviction(pod, namespace, eviction)
        evicted.append(pod)

    def fetch() -> dict[str, Any] | None:
        pods = items(cluster, "pods", namespace, f"dreambooth.dev/job-name={name},dreambooth.dev/component=trainer")
        for pod in pods:
            ip = (pod.get("status") or {}).get("podIP")
            pod_name = pod["metadata"]["name"]
            if ip and pod_name not in scraped_pods:
                container = pod["spec"]["containers"][0]
                port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
                scraped_pods[pod_name] = f"{ip}:{port}"
                targets_file.write_text(
                    json.dumps(
                        [
                            {"targets": [target], "labels": {"namespace": namespace, "pod": scraped}}
                            for scraped, target in scraped_pods.items()
                        ]
                    )
                )
        training = prom.query(
            f'dreambooth_trainer_phase{{{selector}, phase="Training"}} == 1 '
            f"and on (namespace, job) dreambooth_trainer_steps_per_second{{{selector}}} > 0"
        )
        if training:
            seen_training.append(time.time())
        dbj = get(cluster, "dreamboothjob", name, namespace)
        evict_once_after_a_checkpoint(dbj, pods)
        return dbj

    dbj = wait_for("Succeeded", fetch, lambda j: phase(j) in ("Succeeded", "Failed"), TRAIN_TIMEOUT, fast_op)
    assert phase(dbj) == "Succeeded", json.dumps(dbj["status"], indent=1)
    assert evicted, "the trainer was never evicted"
    assert dbj["status"]["restarts"]["preemptions"] == 1, dbj["status"]["restarts"]
    assert len(scraped_pods) == 2, scraped_pods  # the evicted pod and its replacement
    assert set(dbj["status"]["outputs"]["evaluation"]) >= {"dino", "clipI", "clipT"}, dbj["status"]["outputs"]
    assert seen_training, f"Prometheus never saw {name} training (targets {scraped_pods}, {prom.targets()})"
    trained_at = seen_training[-1]

    # A job made to fail: no photos under its prefix (InvalidInput).
    failing = example(s3, bucket)
    failing["metadata"]["name"] = "no-photos"
    failing["spec"]["instanceImages"]["uri"] = f"s3://{bucket}/subjects/nobody/"
    apply(cluster, failing, namespace)
    failed = wait_for(
        "Failed",
        lambda: get(cluster, "dreamboothjob", "no-photos", namespace),
        lambda j: phase(j) in ("Succeeded", "Failed"),
        TRAIN_TIMEOUT,
        fast_op,
    )
    assert phase(failed) == "Failed"
    time.sleep(3)  # a few more scrapes of the operator after the failure

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
    # And the values are this run's: its steps, its one restart (two trainer processes of rank 0; an eviction is a
    # preemption), the scores it was evaluated with.
    (steps,) = _query_at(prom, f"max(dreambooth_trainer_total_steps{{{selector}}})", trained_at)
    assert float(steps["value"][1]) == STEPS
    (restarts,) = _query_at(
        prom, substitute(_expr("job", "Restarts (trainer processes in range)"), {**ranges, **variables}), None
    )
    assert float(restarts["value"][1]) == 1, restarts
    by_reason = _query_at(prom, "sum by (reason) (dreambooth_operator_restarts_total)", None)
    assert {s["metric"].get("reason"): float(s["value"][1]) for s in by_reason} == {"preemption": 1.0}, by_reason
    scores = _query_at(prom, "sum by (metric) (dreambooth_operator_evaluation_score_count)", None)
    assert {s["metric"]["metric"] for s in scores} >= {"dino", "clipI", "clipT"}, scores
    warnings = _query_at(prom, 'dreambooth_operator_events_total{type="Warning"}', None)
    assert warnings, "the failed job emitted no Warning event"

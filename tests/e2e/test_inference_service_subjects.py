"""End to end: an InferenceService's `spec.subjects` selector serves every matching LoRA job as a subject, and a job
that succeeds after the service is Ready becomes servable with no new pods; and the same run proves the chart's
Inference dashboard and serving alerts (issue 18) on a real sampling server.

The service serves the tiny base model (uploaded by the test) on the node agent. The operator publishes the
Succeeded jobs its selector matches in the ConfigMap `<service>-subjects`, which the pod mounts; the node agent
refreshes the mounted file when the ConfigMap changes (as the kubelet does) and the server re-reads it. So the
second job shows up in `GET /v1/models` and `dreambooth generate --subject` draws it, while the service's pods
(uids, restart counts) and its Deployment's generation stay as they were.

Monitoring, on the same run (cheaper than a second service, which would train its own jobs): a real Prometheus
scrapes the serving pod through the chart's own PodMonitor, translated into scrape configs the way the Prometheus
Operator does it (its selector, port, path, honorLabels and the namespace/pod/container/job/endpoint relabelings; the
pods listed from the API server with kubernetes_sd's `__meta_kubernetes_*` labels, since Debian's Prometheus has no
kubernetes_sd), so the `namespace` and `pod` labels the dashboard filters on come from that translation. The service
keeps one adapter loaded, so the second subject evicts the first (the eviction panel has real data); the first
subject's weights are then overwritten with bytes that are no safetensors, and the server answers its requests with
500 (`adapter_load_failed`): the real 5xx DreamBoothServingErrors watches. Prometheus evaluates the chart's two
serving alerts, shortened (tests/alert_rules.py), and after the run every query of every Inference dashboard panel
answers from it, its variables list the run's namespace and pod, and both alerts held with the run's namespace.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import openai

from tests.alert_rules import fired, write_short_run_rules
from tests.chart_queries import panel_queries, substitute, variable_selectors
from tests.e2e.test_inference_service import (
    ONE_THREAD,
    PROMPT,
    TRAIN_TIMEOUT,
    api,
    base_url,
    cli_generate,
    running_pods,
    settled,
    storage,
    wait_ready,
)
from tests.e2e.test_operator_training import phase, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.fixtures import PrometheusFactory
from tests.infra.inference import inference_service
from tests.infra.operator import OperatorProcess, apply, get, items, wait_for
from tests.infra.podmonitor import chart_pod_monitor, pod_monitor_scrape_configs, write_pod_targets
from tests.infra.processes import wait_until
from tests.infra.prometheus import PrometheusServer, Sample
from tests.infra.s3 import S3Server

LABELS = {"team": "avatars"}
SERVICE = "avatars"
SAMPLE = ["-p", PROMPT, "--seed", "7", "--steps", "2"]
REQUEST = {"seed": 7, "num_inference_steps": 2}

SERVING_ALERTS = ("DreamBoothServingErrors", "DreamBoothServingLatencyHigh")
# The alerts' 5-minute windows, shortened so that a few seconds of errors decide them (tests/alert_rules.py).
ALERT_RANGES = {"5m": "30s"}
# A p95 over 20 s (the real threshold, checked by promtool/alerts_test.yaml) needs a real model on a GPU under load;
# the tiny model on the CPU answers in tenths of a second. What this run proves is the rest of the expression (the
# histogram's name and labels, the per-namespace p95), so the threshold is the histogram's first bucket: 50 ms.
ALERT_THRESHOLDS = {"DreamBoothServingLatencyHigh": {"> 20": "> 0.05"}}
DASHBOARD_RANGES = {"__range": "15m", "__rate_interval": "5m"}  # windows that hold the whole serving part of the run


def lora_job(name: str, seed: int, bucket: str, store: dict[str, Any]) -> dict[str, Any]:
    """A tiny LoRA job labelled for the service's selector (no input check: the e2e of that is test_preflight.py); its
    training seed makes its adapter its own (the same seed and data give the same weights)."""
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": name, "labels": LABELS},
        "spec": {
            "baseModel": {"tiny": True},
            "instanceImages": {"uri": f"s3://{bucket}/subjects/dog/", "prompt": PROMPT},
            "training": {"method": "lora", "maxSteps": 4, "resolution": 32, "seed": seed},
            "output": {"uri": f"s3://{bucket}/models/{name}/", "formats": ["lora"]},
            "storage": store,
            "resources": {"gpusPerNode": 0},
            "podTemplate": {"env": ONE_THREAD},
            "runPolicy": {"preflight": False},
        },
    }


def upload_tiny_base(s3: S3Server, bucket: str, tmp_path: Path) -> str:
    """The tiny model the jobs train from (`baseModel: {tiny: true}`), as a diffusers folder in the bucket."""
    from dreambooth_trainer.tiny import build_tiny_pipeline  # torch: only this test needs it

    folder = build_tiny_pipeline(tmp_path / "models")
    client = s3.client()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"base/tiny/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/base/tiny"


def succeeded(cluster: Cluster, namespace: str, op: OperatorProcess, name: str) -> None:
    job = wait_for(
        f"the job {name} to finish",
        lambda: get(cluster, "dreamboothjob", name, namespace),
        lambda j: phase(j) in ("Succeeded", "Failed"),
        TRAIN_TIMEOUT,
        op,
    )
    assert phase(job) == "Succeeded", json.dumps(job["status"], indent=1)


def serving(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """What must not change when a subject is added: the pods (uid -> restarts) and the Deployment's generation."""
    pods = items(cluster, "pods", namespace, f"dreambooth.dev/inference-service={SERVICE}")
    (deployment,) = items(cluster, "deployments", namespace, f"dreambooth.dev/inference-service={SERVICE}")
    return {
        "pods": {p["metadata"]["uid"]: [s["restartCount"] for s in p["status"]["containerStatuses"]] for p in pods},
        "generation": deployment["metadata"]["generation"],
    }


def draw(cluster: Cluster, namespace: str, url: str, subject: str, out: Path) -> bytes:
    """`dreambooth generate --subject`: the PNG it wrote."""
    result = cli_generate(cluster, namespace, SERVICE, *SAMPLE, "--subject", subject, "-o", str(out), "--url", url)
    assert result.returncode == 0, result.stderr
    return (out / f"{subject}-7.png").read_bytes()


def break_weights(s3: S3Server, bucket: str, job: str) -> list[str]:
    """Overwrite the job's LoRA weights in storage with bytes that are no safetensors file (a truncated or clobbered
    upload); returns the keys overwritten."""
    client = s3.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"models/{job}/lora/").get("Contents") or []
    keys = [o["Key"] for o in listed if o["Key"].endswith(".safetensors")]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"these bytes are no safetensors file")
    return keys


def inference_targets() -> list[tuple[str, int, str]]:
    """(panel title, target index, expr) of every target of the Inference dashboard."""
    out: list[tuple[str, int, str]] = []
    for dashboard, title, expr in panel_queries():
        if dashboard == "inference":
            out.append((title, sum(1 for t, _, _ in out if t == title), expr))
    return out


def value(prom: PrometheusServer, expr: str) -> float:
    """The value of a query that answers one sample."""
    samples: list[Sample] = prom.query(expr)
    assert len(samples) == 1, (expr, samples)
    return float(samples[0]["value"][1])


def test_new_subject_no_rollout(
    cluster: Cluster,
    namespace: str,
    s3: S3Server,
    op: OperatorProcess,
    node_agent: Any,
    prometheus: PrometheusFactory,
    tmp_path: Path,
) -> None:
    """A job that succeeds after the service is Ready becomes a subject with no new pods; Prometheus, scraping the
    serving pod through the chart's PodMonitor, answers every Inference dashboard query and holds both serving alerts.
    (A short name: the namespace, and so the chart's object names in it, derive from it.)"""
    monitor = chart_pod_monitor()
    targets_file = tmp_path / "pod-targets.json"
    targets_file.write_text("[]")
    rules = write_short_run_rules(tmp_path / "serving-alerts.yaml", SERVING_ALERTS, ALERT_RANGES, ALERT_THRESHOLDS)
    prom = prometheus(scrape_configs=pod_monitor_scrape_configs(monitor, targets_file), rule_files=[rules])
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    store = storage(cluster, s3, namespace)
    model = {"modelUri": upload_tiny_base(s3, bucket, tmp_path)}
    apply(cluster, lora_job("first", 1, bucket, store), namespace)
    isvc = inference_service(
        SERVICE,
        model,
        storage=store,
        podTemplate={"env": ONE_THREAD},
        subjects={"matchLabels": LABELS},
        server={"maxLoadedAdapters": 1},  # so the second subject evicts the first
    )
    apply(cluster, isvc, namespace)

    succeeded(cluster, namespace, op, "first")
    served = wait_for(
        "the service Ready with one subject",
        lambda: get(cluster, "inferenceservice", SERVICE, namespace),
        lambda s: phase(s) in ("Ready", "Failed") and s["status"].get("subjects") == 1,
        300,
        op,
    )
    assert phase(served) == "Ready", json.dumps(served["status"], indent=1)
    (pod,) = running_pods(cluster, namespace, SERVICE)
    pod_name = pod["metadata"]["name"]
    write_pod_targets(cluster, monitor, targets_file)  # the serving pod discovered (it stays the same: asserted below)
    url = base_url(pod)
    wait_ready(url)
    prom.wait_for(f'up{{namespace="{namespace}", pod="{pod_name}", endpoint="http"}} == 1', timeout=30)
    client = api(url)
    wait_until(lambda: [m.id for m in client.models.list()] == ["base", "first"], timeout=60, what="first listed")
    first = draw(cluster, namespace, url, "first", tmp_path / "first")
    base = client.images.generate(prompt=PROMPT, extra_body=REQUEST)
    assert base64.b64decode((base.data or [])[0].b64_json or "") != first  # the subject's weights were applied
    before = serving(cluster, namespace)

    # A second matching job, after the service is Ready: published to the running server, no rollout.
    apply(cluster, lora_job("second", 2, bucket, store), namespace)
    succeeded(cluster, namespace, op, "second")
    wait_for(
        "two subjects",
        lambda: get(cluster, "inferenceservice", SERVICE, namespace),
        lambda s: s["status"].get("subjects") == 2,
        60,
        op,
    )
    wait_until(
        lambda: [m.id for m in client.models.list()] == ["base", "first", "second"],
        timeout=60,
        what="second listed by the running server",
    )
    second = draw(cluster, namespace, url, "second", tmp_path / "second")
    assert second not in (first, base64.b64decode((base.data or [])[0].b64_json or ""))
    assert serving(cluster, namespace) == before
    assert phase(settled(cluster, namespace, op, SERVICE)) == "Ready"

    # Monitoring. The second subject again: loaded already (an adapter hit). Every request so far succeeded.
    client.images.generate(prompt=PROMPT, model="second", extra_body=REQUEST)
    assert fired(prom, "DreamBoothServingErrors") is None
    # The first subject's weights clobbered in storage: evicted by the second, it loads again and the server
    # answers 500 adapter_load_failed, until the error alert holds.
    assert break_weights(s3, bucket, "first")
    answers: list[tuple[int, str | None]] = []

    def broken_request_then_alert() -> bool:
        try:
            client.images.generate(prompt=PROMPT, model="first", extra_body=REQUEST)
            answers.append((200, None))
        except openai.APIStatusError as err:
            answers.append((err.status_code, err.code))
        return fired(prom, "DreamBoothServingErrors") is not None

    wait_until(broken_request_then_alert, timeout=60, what="DreamBoothServingErrors to hold")
    assert set(answers) == {(500, "adapter_load_failed")}, answers
    wait_until(
        lambda: fired(prom, "DreamBoothServingLatencyHigh") is not None,
        timeout=30,
        what="DreamBoothServingLatencyHigh to hold",
    )
    for alert in SERVING_ALERTS:
        labels = fired(prom, alert) or {}
        assert labels.get("namespace") == namespace, (alert, labels)

    # Every query of every Inference dashboard panel answers from this run, for the run's namespace and pod.
    variables = {"namespace": namespace, "pod": pod_name}
    silent = []
    for title, index, expr in inference_targets():
        promql = substitute(expr, {**DASHBOARD_RANGES, **variables})
        if not prom.query(promql):
            silent.append(f"{title} [{index}]: {promql}")
    assert not silent, "panels with no data from the run:\n" + "\n".join(silent)
    for dashboard, variable, selector in variable_selectors():
        if dashboard == "inference":
            listed = prom.query(f"count by ({variable}) ({substitute(selector, variables)})")
            assert variables[variable] in {s["metric"].get(variable) for s in listed}, (variable, listed)
    # And the values are this run's: its answers by code, its two cold loads, two evictions (the second subject
    # evicting the first, the first's failed reload evicting the second) and one hit, one ready replica.
    selector = f'namespace="{namespace}", pod="{pod_name}"'
    codes = prom.query(f"sum by (code) (dreambooth_serve_requests_total{{{selector}}})")
    assert {s["metric"]["code"] for s in codes} == {"200", "500"}, codes
    assert value(prom, f"sum(dreambooth_serve_adapter_loads_total{{{selector}}})") == 2
    assert value(prom, f"sum(dreambooth_serve_adapter_evictions_total{{{selector}}})") == 2
    assert value(prom, f"sum(dreambooth_serve_adapter_hits_total{{{selector}}})") == 1
    assert value(prom, f"sum(dreambooth_serve_ready{{{selector}}})") == 1
    p95 = next(e for t, i, e in inference_targets() if (t, i) == ("Latency p50, p95, p99", 1))
    assert math.isfinite(value(prom, substitute(p95, {**DASHBOARD_RANGES, **variables})))

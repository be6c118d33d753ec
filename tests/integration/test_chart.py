"""The Helm chart against real tools: helm lint, server-side dry-run of the rendered chart (under the
"restricted" Pod Security level), least-privilege RBAC checked with `kubectl auth can-i`, promtool on the
alerts, and the dashboard's queries answered by a real Prometheus scraping the real exporters."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_wrappers import make_job

from dreambooth_api.progress import TrainerPhase
from dreambooth_operator.builders import build_batch_job
from dreambooth_operator.inference import reconcile_inference
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.settings import OperatorSettings
from dreambooth_trainer.progress import Progress, ProgressServer
from tests.infra.controlplane import Cluster
from tests.infra.fixtures import PrometheusFactory
from tests.infra.processes import free_port, tool
from tests.infra.prometheus import run_promtool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dreambooth-operator"
ALL_FEATURES = [
    "--set=replicas=2",
    "--set=prometheusRule.enabled=true",
    "--set=metrics.serviceMonitor.enabled=true",
    "--set=metrics.trainerPodMonitor.enabled=true",
    "--set=priorityClassName=system-cluster-critical",
    '--set-json=trainer.modelCacheVolume={"persistentVolumeClaim":{"claimName":"dreambooth-model-cache"}}',
]
PSA_LABELS = ["pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/warn=restricted"]


def helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool("helm")), *(str(a) for a in args)], capture_output=True, text=True, check=False, timeout=120
    )


def render(release: str, namespace: str, *sets: str) -> str:
    result = helm("template", release, CHART, "--namespace", namespace, "--kube-version", "v1.36.3", *sets)
    assert result.returncode == 0, result.stderr
    return result.stdout


def docs(rendered: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered) if d]


@pytest.fixture(scope="module")
def chart_crds(cluster: Cluster) -> Cluster:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", "app.kubernetes.io/name")
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/kopfpeerings.kopf.dev")
    return cluster


@pytest.fixture
def restricted_namespace(cluster: Cluster, namespace: str) -> str:
    cluster.kubectl("label", "namespace", namespace, *PSA_LABELS)
    return namespace


@pytest.mark.parametrize("extra", [[], ALL_FEATURES, ["--set=watchNamespaces={a,b}", "--set=logFormat=plain"]])
def test_helm_lint(extra: list[str]) -> None:
    result = helm("lint", "--strict", CHART, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("logFormat=xml", "at '/logFormat': value must be one of 'json', 'plain', 'full'"),
        ("replicas=0", "at '/replicas': minimum: got 0, want 1"),
        ("watchNamespaces={Team_A}", "at '/watchNamespaces/0'"),
    ],
)
def test_values_schema_rejects_bad_values(value: str, message: str) -> None:
    result = helm("template", "x", CHART, f"--set={value}")
    assert result.returncode != 0
    assert message in result.stderr


def test_replicas_without_peering_is_refused() -> None:
    result = helm("template", "x", CHART, "--set=replicas=2", "--set=peering.enabled=false")
    assert result.returncode != 0
    assert "replicas > 1 needs peering.enabled" in result.stderr


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_rendered_chart_passes_server_dry_run_as_restricted(
    chart_crds: Cluster, restricted_namespace: str, mode: str
) -> None:
    ns = restricted_namespace
    sets = [f"--set=watchNamespaces={{{ns}}}"] if mode == "namespaced" else []
    rendered = render(f"dry-{mode}", ns, *sets)
    kinds = {d["kind"] for d in docs(rendered)}
    expected = {"ServiceAccount", "Deployment", "Service", "ConfigMap", "ClusterRole", "ClusterRoleBinding"}
    expected |= {"Role", "RoleBinding", "KopfPeering"} if mode == "namespaced" else {"ClusterKopfPeering"}
    assert expected <= kinds

    result = chart_crds.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(docs(rendered))
    assert "would violate PodSecurity" not in result.stderr


def test_pod_security_flags_a_privileged_override(chart_crds: Cluster, restricted_namespace: str) -> None:
    # The negative control of the test above: the same check does notice a non-restricted pod.
    rendered = render("dry-privileged", restricted_namespace, "--set=securityContext.allowPrivilegeEscalation=true")
    result = chart_crds.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
    assert 'would violate PodSecurity "restricted:latest": allowPrivilegeEscalation != false' in result.stderr


def _can_i(cluster: Cluster, sa: str, *args: str) -> bool:
    result = cluster.kubectl("auth", "can-i", f"--as={sa}", *args, check=False)
    assert result.stdout.strip() in {"yes", "no"}, result.stdout + result.stderr
    return result.stdout.strip() == "yes"


@pytest.fixture
def installed_rbac(chart_crds: Cluster, namespace: str, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """The chart's ServiceAccount and RBAC really applied; yields (mode, service account user name)."""
    mode = request.param
    sets = [f"--set=watchNamespaces={{{namespace}}}"] if mode == "namespaced" else []
    objects = [
        d
        for d in docs(render(namespace, namespace, *sets))
        if d["kind"] in {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    ]
    manifest = yaml.safe_dump_all(objects)
    chart_crds.kubectl("apply", "-f", "-", input=manifest)
    sa = next(d for d in objects if d["kind"] == "ServiceAccount")["metadata"]["name"]
    yield mode, f"system:serviceaccount:{namespace}:{sa}"
    chart_crds.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifest, check=False)


@pytest.mark.parametrize("installed_rbac", ["cluster-wide", "namespaced"], indirect=True)
def test_rbac_is_least_privilege(chart_crds: Cluster, namespace: str, installed_rbac: tuple[str, str]) -> None:
    mode, sa = installed_rbac
    c = chart_crds
    here = ["-n", namespace]
    # What the operator needs, in a watched namespace.
    for verb, resource in [
        ("watch", "dreamboothjobs.dreambooth.dev"),
        ("patch", "dreamboothjobs.dreambooth.dev"),
        ("watch", "inferenceservices.dreambooth.dev"),
        ("create", "jobs.batch"),
        ("delete", "jobs.batch"),
        ("create", "services"),
        ("create", "configmaps"),
        ("create", "deployments.apps"),
        ("patch", "deployments.apps"),  # server-side apply
        ("create", "horizontalpodautoscalers.autoscaling"),
        ("watch", "pods"),
        ("delete", "pods"),  # force-deleting a job's pods stuck Terminating on a lost node
        ("create", "events"),
    ]:
        assert _can_i(c, sa, verb, resource, *here), f"{sa} cannot {verb} {resource}"
    assert _can_i(c, sa, "patch", "dreamboothjobs.dreambooth.dev", "--subresource=status", *here)
    assert _can_i(c, sa, "patch", "inferenceservices.dreambooth.dev", "--subresource=status", *here)
    for kind in ("dreamboothjobs", "inferenceservices"):
        assert _can_i(c, sa, "update", f"{kind}.dreambooth.dev", "--subresource=finalizers", *here)
    assert _can_i(c, sa, "list", "customresourcedefinitions.apiextensions.k8s.io")
    # And nothing more: no secrets, no pod creation or exec, no CRD or RBAC changes, and no "update" (PUT) but on
    # finalizers (the operator and kopf only patch and server-side apply).
    for verb, resource, *extra in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("create", "pods", "--subresource=exec"),
        ("delete", "dreamboothjobs.dreambooth.dev"),
        ("update", "dreamboothjobs.dreambooth.dev"),
        ("update", "inferenceservices.dreambooth.dev", "--subresource=status"),
        ("update", "jobs.batch"),
        ("update", "configmaps"),
        ("update", "deployments.apps"),
        ("update", "horizontalpodautoscalers.autoscaling"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("patch", "nodes"),
    ]:
        assert not _can_i(c, sa, verb, resource, *extra, *here), f"{sa} can {verb} {resource}"
    if mode == "cluster-wide":
        assert _can_i(c, sa, "list", "dreamboothjobs.dreambooth.dev", "--all-namespaces")
        assert _can_i(c, sa, "patch", "clusterkopfpeerings.kopf.dev")
    else:
        assert _can_i(c, sa, "patch", "kopfpeerings.kopf.dev", *here)
        assert not _can_i(c, sa, "create", "jobs.batch", "-n", "kube-system")
        assert not _can_i(c, sa, "list", "dreamboothjobs.dreambooth.dev", "--all-namespaces")


def test_monitoring_objects_render_from_the_alert_file() -> None:
    rendered = docs(render("mon", "monitoring", *ALL_FEATURES, "--set=watchNamespaces={team-a}"))
    by_kind = {d["kind"]: d for d in rendered}
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert by_kind["PrometheusRule"]["spec"] == alerts
    assert by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    pod_monitor = by_kind["PodMonitor"]["spec"]
    assert pod_monitor["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert pod_monitor["selector"]["matchExpressions"][0]["key"] == "dreambooth.dev/component"
    assert all(e["honorLabels"] for e in pod_monitor["podMetricsEndpoints"])
    # Every port that the operator's pods serve /metrics on is scraped: training pods and serving pods.
    scraped = {e["port"] for e in pod_monitor["podMetricsEndpoints"]}
    trainer = build_batch_job(make_job("cat").obj(), 0, OperatorSettings())["spec"]["template"]["spec"]
    isvc = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "dog", "namespace": "ns", "uid": "uid-dog", "generation": 1},
        "spec": {"model": {"modelUri": "s3://bucket/models/dog/model"}},
    }
    plan = reconcile_inference(isvc, None, None, OperatorSettings(), datetime.now(UTC))
    server = next(c for c in plan.children if c["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {p["name"] for p in trainer["containers"][0]["ports"]} & scraped == {"metrics"}
    assert {p["name"] for p in server["containers"][0]["ports"]} & scraped == {"http"}
    deployment = by_kind["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    assert "strategy" not in deployment["spec"]  # rolling update with peering when replicated
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["DREAMBOOTH_OPERATOR_NAMESPACES"]) == ["team-a"]
    assert env["DREAMBOOTH_OPERATOR_TRAINER_IMAGE"] == "ghcr.io/dreambooth-operator/trainer:0.1.0"
    dashboard = next(d for d in rendered if d["kind"] == "ConfigMap")
    assert json.loads(dashboard["data"]["dreambooth-operator.json"]) == json.loads(
        (CHART / "files" / "dashboard.json").read_text()
    )


def test_alert_rules_pass_promtool() -> None:
    checked = run_promtool("check", "rules", CHART / "files" / "alerts.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    tested = run_promtool("test", "rules", CHART / "promtool" / "alerts_test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def _substitute(expr: str) -> str:
    # Grafana's variables, as Grafana would expand them for a short range.
    return expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$namespace", ".*")


def test_dashboard_queries_answer_from_real_exporters(prometheus: PrometheusFactory) -> None:
    operator_port, trainer_port = free_port(), free_port()
    metrics = OperatorMetrics()
    metrics.serve(operator_port, "127.0.0.1")
    metrics.set_phase("team-a", "dog", "Running")
    metrics.set_phase("team-a", "cat", "Succeeded")
    metrics.restarts.labels(reason="preemption").inc()
    metrics.steps_redone.inc(5)
    metrics.time_to_running.observe(42)
    metrics.job_duration.labels(phase="Succeeded").observe(600)
    metrics.job_gpu_seconds.labels(phase="Succeeded").observe(900)
    metrics.job_gpu_seconds.labels(phase="Failed").observe(120)
    metrics.reconcile_duration.observe(0.02)
    metrics.progress_polls.labels(result="ok").inc()
    progress = Progress("dog", "team-a", 0, total_steps=800)
    progress.set_phase(TrainerPhase.TRAINING)
    server = ProgressServer(progress, host="127.0.0.1", port=trainer_port).start()
    try:
        for step in (1, 2, 3):
            progress.on_step(step, loss=0.25, lr=1e-4, images=1, data_wait=0.0)
        progress.on_checkpoint(3, "s3://b/o/checkpoints/step-00000003", "2026-11-27T00:00:00Z", 100, 0.5)
        # honor_labels, as the chart's PodMonitor sets: the trainer's own `job` label (the DreamBoothJob's name)
        # must win over the scrape job's name.
        scrape = {
            "job_name": "dreambooth",
            "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{operator_port}", f"127.0.0.1:{trainer_port}"]}],
        }
        prom = prometheus(scrape_configs=[scrape])
        dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        # Every query is valid PromQL and returns series once a few scrapes are in.
        for expr in exprs:
            prom.wait_for(_substitute(expr), timeout=60)
        progress_expr = next(e for e in exprs if "dreambooth_trainer_total_steps" in e)
        (sample,) = prom.query(_substitute(progress_expr))
        assert sample["metric"] == {"namespace": "team-a", "job": "dog"}
        assert float(sample["value"][1]) == pytest.approx(3 / 800)
        phases = {
            s["metric"]["phase"]: float(s["value"][1]) for s in prom.query("sum by (phase) (dreambooth_operator_jobs)")
        }
        assert phases["Running"] == 1
        assert phases["Succeeded"] == 1
        # GPU-minutes per succeeded job: the jobs that ended within the range only (a later job's 1500 s).
        gpu_expr = _substitute(next(e for e in exprs if "job_gpu_seconds_sum" in e))
        metrics.job_gpu_seconds.labels(phase="Succeeded").observe(1500)
        (per_job,) = prom.wait_for(gpu_expr, lambda r: bool(r) and float(r[0]["value"][1]) > 0, timeout=60)
        assert float(per_job["value"][1]) == pytest.approx(1500 / 60)
        # GPU-minutes spent on failed jobs: only those failing within the range (a later 300 s one).
        failed_expr = _substitute(next(e for e in exprs if 'phase="Failed"' in e and "job_gpu_seconds" in e))
        metrics.job_gpu_seconds.labels(phase="Failed").observe(300)
        (spent,) = prom.wait_for(failed_expr, lambda r: bool(r) and float(r[0]["value"][1]) > 0, timeout=60)
        assert float(spent["value"][1]) > 0
    finally:
        server.stop()


def test_model_cache_volume_reaches_the_operator_as_json_it_parses() -> None:
    claim = {"persistentVolumeClaim": {"claimName": "dreambooth-model-cache"}}
    rendered = docs(render("mc", "ops", f"--set-json=trainer.modelCacheVolume={json.dumps(claim)}"))
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    value = env["DREAMBOOTH_OPERATOR_MODEL_CACHE_VOLUME"]
    assert value is not None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAMBOOTH_OPERATOR_MODEL_CACHE_VOLUME", value)
        assert OperatorSettings().model_cache_volume == claim
    # off by default
    rendered = docs(render("mc", "ops"))
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    names = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "DREAMBOOTH_OPERATOR_MODEL_CACHE_VOLUME" not in names

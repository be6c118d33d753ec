"""The Helm chart against real tools: helm lint, server-side dry-run of the rendered chart (under the
"restricted" Pod Security level), least-privilege RBAC checked with `kubectl auth can-i`. promtool on the alerts is
tests/unit/test_chart_alerts.py; the dashboards' queries answered by a real Prometheus scraping the real exporters are
tests/integration/test_chart_dashboards_exporters.py; every values combination applied with --dry-run=server is
tests/integration/test_chart_quality.py."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from dreambooth_operator.builders import build_batch_job
from dreambooth_operator.inference import reconcile_inference
from dreambooth_operator.settings import OperatorSettings
from tests.infra.controlplane import Cluster
from tests.infra.paths import ROOT
from tests.infra.processes import tool, wait_until
from tests.infra.wrappers import make_job

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
        ("delete", "horizontalpodautoscalers.autoscaling"),  # a stale one, once autoscaling is off
        ("get", "configmaps"),  # who controls it, before any write
        ("create", "networkpolicies.networking.k8s.io"),
        ("patch", "networkpolicies.networking.k8s.io"),
        ("delete", "networkpolicies.networking.k8s.io"),
        ("watch", "deployments.apps"),
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
        # What the code never does: list or watch the children it does not watch, delete a Deployment (the garbage
        # collector does), patch an event, read a pod or batch Job by name, read a status subresource.
        ("list", "configmaps"),
        ("watch", "services"),
        ("list", "horizontalpodautoscalers.autoscaling"),
        ("watch", "networkpolicies.networking.k8s.io"),
        ("delete", "deployments.apps"),
        ("patch", "events"),
        ("create", "events.events.k8s.io"),  # kopf posts core/v1 events only
        # kopf lists and watches what it discovers and its peerings; it never reads one by name.
        ("get", "customresourcedefinitions.apiextensions.k8s.io"),
        ("get", "namespaces"),
        ("get", "kopfpeerings.kopf.dev"),
        ("get", "clusterkopfpeerings.kopf.dev"),
        ("get", "inferenceservices.dreambooth.dev"),  # only a DreamBoothJob is read again by name
        ("get", "pods"),
        ("get", "jobs.batch"),
        ("get", "dreamboothjobs.dreambooth.dev", "--subresource=status"),
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
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["DREAMBOOTH_OPERATOR_NAMESPACES"]) == ["team-a"]
    assert env["DREAMBOOTH_OPERATOR_TRAINER_IMAGE"] == "ghcr.io/dreambooth-operator/trainer:0.1.0"
    # One ConfigMap per dashboard (tests/unit/test_chart_dashboards.py checks their content).
    dashboards = {d["metadata"]["name"] for d in rendered if d["kind"] == "ConfigMap"}
    assert {f"mon-dreambooth-operator-dashboard-{n}" for n in ("fleet", "job", "inference")} <= dashboards


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


@pytest.fixture
def aggregated_roles(chart_crds: Cluster) -> Iterator[None]:
    objects = [
        d
        for d in docs(render("agg", "ops"))
        if d["kind"] == "ClusterRole" and d["metadata"]["name"].startswith("dreambooth-")
    ]
    assert sorted(d["metadata"]["name"] for d in objects) == ["dreambooth-edit", "dreambooth-view"]
    manifest = yaml.safe_dump_all(objects)
    chart_crds.kubectl("apply", "-f", "-", input=manifest)
    yield
    chart_crds.kubectl("delete", "--ignore-not-found", "-f", "-", input=manifest, check=False)


def test_namespace_editors_and_viewers_get_the_custom_resources_through_aggregation(
    chart_crds: Cluster, namespace: str, aggregated_roles: None
) -> None:
    c = chart_crds
    for role, user in (("edit", "editor"), ("view", "viewer")):
        c.kubectl(
            "create", "rolebinding", f"{user}-binding", "-n", namespace, f"--clusterrole={role}", f"--user={user}"
        )
    here = ["-n", namespace]

    def granted(user: str, verb: str, resource: str) -> bool:
        result = c.kubectl("auth", "can-i", f"--as={user}", verb, resource, *here, check=False)
        return result.stdout.strip() == "yes"

    # The clusterrole-aggregation controller copies the rules into the built-in roles.
    wait_until(
        lambda: granted("editor", "create", "dreamboothjobs.dreambooth.dev"),
        what="the edit role to aggregate dreambooth-edit",
        timeout=60,
    )
    for resource in ("dreamboothjobs.dreambooth.dev", "inferenceservices.dreambooth.dev"):
        for verb in ("create", "patch", "delete", "list"):
            assert granted("editor", verb, resource), (verb, resource)
        assert granted("viewer", "list", resource)
        assert granted("viewer", "watch", resource)
        for verb in ("create", "patch", "delete"):
            assert not granted("viewer", verb, resource), (verb, resource)
    # Nobody but the operator writes the status.
    result = c.kubectl(
        "auth", "can-i", "--as=editor", "patch", "dreamboothjobs.dreambooth.dev", "--subresource=status", *here,
        check=False,
    )  # fmt: skip
    assert result.stdout.strip() == "no"


def test_every_operator_setting_the_chart_renders_parses() -> None:
    rendered = docs(
        render(
            "settings",
            "ops",
            "--set=replicas=2",
            '--set-json=restrictions={"imagePrefixes":["registry.corp/ml/"],"serviceAccounts":[]}',
            '--set-json=namespaceRestrictions={"team-a":{"priorityClasses":["low"]}}',
            '--set-json=networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"x":"y"}}}]',
            '--set-json=networkPolicy.servingFrom=[{"podSelector":{}}]',
        )
    )
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"] if e["name"].startswith("DREAMBOOTH_OPERATOR_")}
    from_field = {e["name"] for e in container["env"] if "valueFrom" in e}
    assert from_field == {"DREAMBOOTH_OPERATOR_OPERATOR_NAMESPACE"}  # the pod's namespace, from the downward API
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            if value is not None:
                mp.setenv(name, value)
        mp.setenv("DREAMBOOTH_OPERATOR_OPERATOR_NAMESPACE", "ops")
        settings = OperatorSettings()
    assert settings.peering_mandatory is True
    assert settings.restrictions.image_prefixes == ("registry.corp/ml/",)
    assert settings.restrictions.service_accounts == ()
    assert settings.namespace_restrictions["team-a"].priority_classes == ("low",)
    assert settings.network_policies is True
    # The NetworkPolicies admit the chart's operator pods: the Deployment's own pod labels.
    assert settings.operator_pod_labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert settings.operator_pod_labels == deployment["spec"]["selector"]["matchLabels"]
    assert settings.metrics_ingress_from == [{"namespaceSelector": {"matchLabels": {"x": "y"}}}]
    assert settings.serving_ingress_from == [{"podSelector": {}}]
    # One replica: peering is not mandatory; no servingFrom: the default (the namespace).
    single = next(d for d in docs(render("settings", "ops")) if d["kind"] == "Deployment")
    single_env = {e["name"]: e.get("value") for e in single["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert single_env["DREAMBOOTH_OPERATOR_PEERING_MANDATORY"] == "false"
    assert "DREAMBOOTH_OPERATOR_SERVING_INGRESS_FROM" not in single_env

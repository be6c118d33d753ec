"""tests/infra/podmonitor.py: the chart's PodMonitor, translated as the Prometheus Operator does, is a scrape config
Prometheus accepts; label selectors become its keep/drop rules; a field the translation does not know is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.infra.podmonitor import chart_pod_monitor, discovered, pod_monitor_scrape_configs, selector_relabelings
from tests.infra.prometheus import prometheus_config, run_promtool

pytestmark = pytest.mark.unit


def test_the_charts_pod_monitor_becomes_a_config_promtool_accepts(tmp_path: Path) -> None:
    monitor = chart_pod_monitor()
    configs = pod_monitor_scrape_configs(monitor, tmp_path / "targets.json")
    assert [c["job_name"] for c in configs] == [
        f"podMonitor/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}/{i}"
        for i in range(len(monitor["spec"]["podMetricsEndpoints"]))
    ]
    for config, endpoint in zip(configs, monitor["spec"]["podMetricsEndpoints"], strict=True):
        assert config["honor_labels"] is bool(endpoint.get("honorLabels", False))
        targets = {r.get("target_label") for r in config["relabel_configs"]}
        assert {"namespace", "pod", "container", "job", "endpoint"} <= targets
    path = tmp_path / "prometheus.yml"
    path.write_text(
        json.dumps(
            prometheus_config(scrape_configs=configs, rule_files=[], scrape_interval="1s", evaluation_interval="1s")
        )
    )
    checked = run_promtool("check", "config", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_label_selectors_become_keep_and_drop_rules() -> None:
    rules = selector_relabelings(
        {
            "matchLabels": {"app.kubernetes.io/part-of": "dreambooth"},
            "matchExpressions": [
                {"key": "dreambooth.dev/component", "operator": "In", "values": ["trainer", "server"]},
                {"key": "skip", "operator": "DoesNotExist"},
            ],
        }
    )
    assert rules == [
        {
            "action": "keep",
            "source_labels": [
                "__meta_kubernetes_pod_label_app_kubernetes_io_part_of",
                "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_part_of",
            ],
            "regex": "(dreambooth);true",
        },
        {
            "action": "keep",
            "source_labels": [
                "__meta_kubernetes_pod_label_dreambooth_dev_component",
                "__meta_kubernetes_pod_labelpresent_dreambooth_dev_component",
            ],
            "regex": "(trainer|server);true",
        },
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_labelpresent_skip"], "regex": "true"},
    ]


def test_a_field_the_translation_does_not_know_is_refused(tmp_path: Path) -> None:
    monitor = chart_pod_monitor()
    monitor["spec"]["podMetricsEndpoints"][0]["relabelings"] = [{"action": "drop"}]
    with pytest.raises(AssertionError, match="relabelings"):
        pod_monitor_scrape_configs(monitor, tmp_path / "targets.json")


def test_discovery_gives_each_port_of_each_pod_with_an_ip_its_meta_labels() -> None:
    def pod(name: str, namespace: str, ip: str | None) -> dict[str, object]:
        return {
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "labels": {"a.b/c": "x"}},
            "spec": {
                "nodeName": "n",
                "containers": [{"name": "trainer", "ports": [{"name": "metrics", "containerPort": 9}]}],
            },
            "status": {"podIP": ip, "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }

    pods = [pod("a", "team", "10.0.0.1"), pod("b", "team", None), pod("c", "other", "10.0.0.3")]
    (group,) = discovered(pods, {"matchNames": ["team"]})
    assert group["targets"] == ["10.0.0.1:9"]
    labels = group["labels"]
    assert labels["__meta_kubernetes_namespace"] == "team"
    assert labels["__meta_kubernetes_pod_name"] == "a"
    assert labels["__meta_kubernetes_pod_label_a_b_c"] == "x"
    assert labels["__meta_kubernetes_pod_labelpresent_a_b_c"] == "true"
    assert labels["__meta_kubernetes_pod_container_port_name"] == "metrics"
    assert labels["__meta_kubernetes_pod_ready"] == "true"
    assert len(discovered(pods, {"any": True})) == 2

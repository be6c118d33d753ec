"""The chart's PodMonitor as the Prometheus Operator turns it into Prometheus scrape configs, for e2e runs.

The test Prometheus is Debian's build, which has no kubernetes_sd; so the pods are listed from the API server and
written to a file_sd targets file with the `__meta_kubernetes_*` labels kubernetes_sd's pod role would give them, and
the PodMonitor's selector, port, path, honorLabels and the operator's namespace/pod/container/job/endpoint
relabelings become each endpoint's scrape config. The `namespace` and `pod` labels the dashboards filter on then come
from that translation, as they do in a cluster. Only the fields the chart's PodMonitor uses are translated; any other
field is refused, so a change to the chart's monitor fails loudly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.chart_queries import render_chart
from tests.infra.controlplane import Cluster

# The chart as installed with its PodMonitor on; the interval is the chart's own value, at 1 s for a short run.
RELEASE, RELEASE_NAMESPACE = "dreambooth-operator", "dreambooth-system"
MONITOR_VALUES = ("--set=metrics.trainerPodMonitor.enabled=true", "--set=metrics.trainerPodMonitor.interval=1s")


def chart_pod_monitor() -> dict[str, Any]:
    """The chart's PodMonitor for training and serving pods (templates/monitors.yaml), rendered by helm."""
    rendered = render_chart(*MONITOR_VALUES, release=RELEASE, namespace=RELEASE_NAMESPACE)
    (monitor,) = [d for d in rendered if d["kind"] == "PodMonitor"]
    return monitor


PORT_META = "__meta_kubernetes_pod_container_port"


def _meta_name(key: str) -> str:
    """A Kubernetes label key as a Prometheus label name (strutil.SanitizeLabelName)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def selector_relabelings(selector: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A label selector as keep/drop rules on the pod's label meta labels, as the Prometheus Operator writes them."""

    def labels(key: str) -> list[str]:
        name = _meta_name(key)
        return [f"__meta_kubernetes_pod_label_{name}", f"__meta_kubernetes_pod_labelpresent_{name}"]

    out: list[dict[str, Any]] = [
        {"action": "keep", "source_labels": labels(k), "regex": f"({v});true"}
        for k, v in sorted((selector.get("matchLabels") or {}).items())
    ]
    for expr in selector.get("matchExpressions") or []:
        values, present = "|".join(expr.get("values") or []), labels(expr["key"])[1:]
        out.append(
            {
                "In": {"action": "keep", "source_labels": labels(expr["key"]), "regex": f"({values});true"},
                "NotIn": {"action": "drop", "source_labels": labels(expr["key"]), "regex": f"({values});true"},
                "Exists": {"action": "keep", "source_labels": present, "regex": "true"},
                "DoesNotExist": {"action": "drop", "source_labels": present, "regex": "true"},
            }[expr["operator"]]
        )
    return out


def pod_monitor_scrape_configs(monitor: Mapping[str, Any], targets_file: Path) -> list[dict[str, Any]]:
    """One scrape config per podMetricsEndpoint, as the Prometheus Operator generates it (job
    `podMonitor/<ns>/<name>/<i>`), with file_sd over `targets_file` (written by `write_pod_targets`) in place of
    kubernetes_sd's pod role. Only the fields the chart's PodMonitor uses are translated; any other is refused."""
    meta, spec = monitor["metadata"], monitor["spec"]
    known = {"namespaceSelector", "selector", "podMetricsEndpoints"}
    assert set(spec) <= known, f"PodMonitor fields this translation does not know: {set(spec) - known}"
    configs = []
    for index, endpoint in enumerate(spec["podMetricsEndpoints"]):
        unknown = set(endpoint) - {"port", "path", "interval", "honorLabels"}
        assert not unknown, f"podMetricsEndpoint fields this translation does not know: {unknown}"
        relabelings = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
            *selector_relabelings(spec["selector"]),
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": endpoint["port"],
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
        ]
        configs.append(
            {
                "job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/{index}",
                "honor_labels": bool(endpoint.get("honorLabels", False)),
                "metrics_path": endpoint.get("path", "/metrics"),
                "scrape_interval": endpoint["interval"],
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
                "relabel_configs": relabelings,
            }
        )
    return configs


def discovered(pods: Sequence[Mapping[str, Any]], namespace_selector: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What kubernetes_sd's pod role discovers among `pods` (as the API returns them): one target per container port
    of every pod with an IP (in the namespaces the PodMonitor's namespaceSelector names, or all), with the
    `__meta_kubernetes_*` labels it sets."""
    names = None if namespace_selector.get("any") else set(namespace_selector.get("matchNames") or [])
    groups: list[dict[str, Any]] = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        if not status.get("podIP") or (names is not None and meta["namespace"] not in names):
            continue
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
        labels = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": status["podIP"],
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_ready": str(ready).lower(),
            "__meta_kubernetes_pod_node_name": pod["spec"].get("nodeName", ""),
            "__meta_kubernetes_pod_uid": meta["uid"],
        }
        for key, value in (meta.get("labels") or {}).items():
            labels[f"__meta_kubernetes_pod_label_{_meta_name(key)}"] = value
            labels[f"__meta_kubernetes_pod_labelpresent_{_meta_name(key)}"] = "true"
        groups.extend(
            {
                "targets": [f"{status['podIP']}:{port['containerPort']}"],
                "labels": {
                    **labels,
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_init": "false",
                    f"{PORT_META}_name": port.get("name", ""),
                    f"{PORT_META}_number": str(port["containerPort"]),
                    f"{PORT_META}_protocol": port.get("protocol", "TCP"),
                },
            }
            for container in pod["spec"]["containers"]
            for port in container.get("ports") or []
        )
    return groups


def write_targets(pods: Sequence[Mapping[str, Any]], monitor: Mapping[str, Any], targets_file: Path) -> None:
    """`pods` as discovery sees them, for file_sd (written whole, then renamed: never read half-written)."""
    tmp = targets_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(discovered(pods, monitor["spec"].get("namespaceSelector") or {})))
    tmp.replace(targets_file)


def write_pod_targets(cluster: Cluster, monitor: Mapping[str, Any], targets_file: Path) -> None:
    """Every pod of the cluster now, as discovery sees it, for file_sd."""
    pods = json.loads(cluster.kubectl("get", "pods", "--all-namespaces", "-o", "json").stdout)["items"]
    write_targets(pods, monitor, targets_file)

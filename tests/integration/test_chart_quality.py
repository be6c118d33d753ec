"""Every meaningful values combination of the chart (tests/chart_queries.VALUE_COMBINATIONS, the same ones
`helm lint --strict` checks) renders objects the real API server accepts with `kubectl apply --dry-run=server
--validate=strict`, in a namespace that enforces Pod Security "restricted".

The monitoring.coreos.com objects (ServiceMonitor, PodMonitor, PrometheusRule) need their CRDs: the test installs
CRDs for them whose schemas hold the fields of prometheus-operator's v1 API that the chart renders (names, types,
duration patterns and required fields as upstream has them, no unknown fields), so a misspelled field, a bad
interval or a rule without `expr` is refused by the API server as it would be with the real CRDs."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.chart_queries import CHART, VALUE_COMBINATIONS, helm_path, value_combination
from tests.infra.controlplane import Cluster

PSA_LABELS = ["pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/warn=restricted"]
# prometheus-operator's duration pattern (monitoring.coreos.com/v1 Duration).
DURATION = {
    "type": "string",
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"type": "string"},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
NAMESPACE_SELECTOR = {
    "type": "object",
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
ENDPOINT_COMMON = {
    "port": {"type": "string"},
    "path": {"type": "string"},
    "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
    "interval": DURATION,
    "scrapeTimeout": DURATION,
    "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"},
}
SPECS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["selector"],
        "properties": {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": NAMESPACE_SELECTOR,
            "jobLabel": {"type": "string"},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "endpoints": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {**ENDPOINT_COMMON, "targetPort": {"x-kubernetes-int-or-string": True}},
                },
            },
        },
    },
    "PodMonitor": {
        "type": "object",
        "required": ["selector"],
        "properties": {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": NAMESPACE_SELECTOR,
            "jobLabel": {"type": "string"},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "podMetricsEndpoints": {
                "type": "array",
                "items": {"type": "object", "properties": {**ENDPOINT_COMMON, "portNumber": {"type": "integer"}}},
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": DURATION,
                        "query_offset": DURATION,
                        "limit": {"type": "integer"},
                        "labels": STRING_MAP,
                        "partial_response_strategy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["expr"],
                                "properties": {
                                    "alert": {"type": "string"},
                                    "record": {"type": "string"},
                                    "expr": {
                                        "anyOf": [{"type": "integer"}, {"type": "string"}],
                                        "x-kubernetes-int-or-string": True,
                                    },
                                    "for": DURATION,
                                    "keep_firing_for": {**DURATION, "minLength": 1},
                                    "labels": STRING_MAP,
                                    "annotations": STRING_MAP,
                                },
                            },
                        },
                    },
                },
            }
        },
    },
}


def monitoring_crd(kind: str) -> dict[str, Any]:
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com", "labels": {"dreambooth.dev/test": "chart-quality"}},
        "spec": {
            "group": "monitoring.coreos.com",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": SPECS[kind],
                            },
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[Cluster]:
    """The control plane with the chart's CRDs (crds/) and the monitoring CRDs above, all Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    monitoring = yaml.safe_dump_all([monitoring_crd(kind) for kind in SPECS])
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=monitoring)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", "app.kubernetes.io/name")
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", "dreambooth.dev/test=chart-quality"
    )
    yield cluster
    cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=monitoring, check=False)


@pytest.fixture
def restricted(cluster: Cluster, namespace: str) -> str:
    cluster.kubectl("label", "--overwrite", "namespace", namespace, *PSA_LABELS)
    return namespace


def _render(namespace: str, flags: list[str]) -> str:
    result = subprocess.run(
        [helm_path(), "template", "quality", str(CHART), "--namespace", namespace, "--kube-version", "v1.36.3", *flags],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _dry_run(cluster: Cluster, rendered: str) -> tuple[int, str, str]:
    result = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=rendered, check=False)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("name", VALUE_COMBINATIONS)
def test_every_values_combination_passes_server_dry_run_as_restricted(api: Cluster, restricted: str, name: str) -> None:
    rendered = _render(restricted, value_combination(name, restricted))
    objects = [d for d in yaml.safe_load_all(rendered) if d]
    code, out, err = _dry_run(api, rendered)
    assert code == 0, err
    assert out.count("(server dry run)") == len(objects), out
    assert "would violate PodSecurity" not in err
    assert "Warning" not in err, err
    kinds = {d["kind"] for d in objects}
    if name.startswith("monitoring"):
        assert {"ServiceMonitor", "PodMonitor"} <= kinds
    if name == "monitoring":
        assert "PrometheusRule" in kinds


def test_the_monitoring_crds_refuse_what_prometheus_operator_would(api: Cluster, restricted: str) -> None:
    """The negative control of the test above: a bad duration, a field prometheus-operator does not have and a rule
    without `expr` are refused. (A pod that is not "restricted" is test_chart.py's negative control.)"""
    rendered = _render(restricted, ["--set=metrics.serviceMonitor.enabled=true"])
    monitor = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "ServiceMonitor")
    bad_interval = copy.deepcopy(monitor)
    bad_interval["spec"]["endpoints"][0]["interval"] = "30 seconds"
    code, _, err = _dry_run(api, yaml.safe_dump(bad_interval))
    assert code != 0
    assert "spec.endpoints[0].interval: Invalid value" in err
    misspelled = copy.deepcopy(monitor)
    misspelled["spec"]["endpoints"][0]["honourLabels"] = True
    code, _, err = _dry_run(api, yaml.safe_dump(misspelled))
    assert code != 0
    assert 'unknown field "spec.endpoints[0].honourLabels"' in err
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "broken", "namespace": restricted},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "NoExpr", "for": "5 minutes"}]}]},
    }
    code, _, err = _dry_run(api, yaml.safe_dump(rule))
    assert code != 0
    assert "spec.groups[0].rules[0].expr: Required value" in err

"""The PromQL of the chart's dashboards and alerts, for the tests that check it (tests/unit/test_chart_*.py,
tests/integration/test_chart.py): the expressions, Grafana's variables substituted, the metric names an expression
selects, and the names the code registers (operator, trainer, sampling server)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.infra.paths import ROOT

CHART = ROOT / "charts" / "dreambooth-operator"
DASHBOARD_NAMES = ("fleet", "job", "inference")

# Names the dashboards and alerts use that the code does not register yet, each with why. The unit tests accept them
# (and fail once one is no longer used); the lead reconciles them with the modules being written.
PENDING_METRICS: Mapping[str, str] = {}

# Each meaningful combination of the chart's values: `helm lint --strict` (tests/unit/test_chart_values.py) and
# `kubectl apply --dry-run=server` under Pod Security "restricted" (tests/integration/test_chart_quality.py) take
# the same ones. `{ns}` is a namespace that exists (the test's own).
VALUE_COMBINATIONS: Mapping[str, tuple[str, ...]] = {
    "defaults": (),
    "namespaced": ("--set=watchNamespaces={{ns}}", "--set=logFormat=plain", "--set=verbose=true"),
    "monitoring": (
        "--set=prometheusRule.enabled=true",
        "--set=prometheusRule.labels.release=kube-prometheus-stack",
        "--set=metrics.serviceMonitor.enabled=true",
        "--set=metrics.serviceMonitor.interval=1m",
        "--set=metrics.trainerPodMonitor.enabled=true",
        "--set=metrics.trainerPodMonitor.labels.release=kube-prometheus-stack",
    ),
    "monitoring-namespaced": (
        "--set=watchNamespaces={{ns}}",
        "--set=metrics.serviceMonitor.enabled=true",
        "--set=metrics.trainerPodMonitor.enabled=true",
    ),
    "replicated": (
        "--set=replicas=2",
        "--set=priorityClassName=system-cluster-critical",
        '--set-json=trainer.modelCacheVolume={"persistentVolumeClaim":{"claimName":"dreambooth-model-cache"}}',
    ),
    "dashboards-elsewhere": (
        "--set=dashboards.namespace={ns}",
        '--set-json=dashboards.annotations={"grafana_folder":"DreamBooth"}',
    ),
    "minimal": (
        "--set=dashboards.enabled=false",
        "--set=peering.enabled=false",
        "--set=serviceAccount.create=false",
        "--set=serviceAccount.name=dreambooth",
    ),
}


def value_combination(name: str, namespace: str) -> list[str]:
    """The helm flags of one combination, `{ns}` replaced by `namespace`."""
    return [flag.replace("{ns}", namespace) for flag in VALUE_COMBINATIONS[name]]


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def helm_path() -> str:
    """The pinned helm (`make binaries`), or one on PATH."""
    helm = shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")
    assert Path(helm).exists(), "helm is missing: make binaries"
    return helm


def render_chart(*sets: str, release: str = "dbo", namespace: str = "ops") -> list[dict[str, Any]]:
    """`helm template` of the chart with `sets` (`--set=...` flags): its non-empty documents."""
    result = subprocess.run(
        [helm_path(), "template", release, str(CHART), "--namespace", namespace, *sets],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def dashboard(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((CHART / "files" / f"dashboard-{name}.json").read_text())
    return doc


def panels(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows, those inside collapsed rows included."""
    out: list[dict[str, Any]] = []
    for panel in doc["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels") or [])
        else:
            out.append(panel)
    return out


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard name, panel title, expr) for every target of every panel of the three dashboards."""
    return [
        (name, panel["title"], target["expr"])
        for name in DASHBOARD_NAMES
        for panel in panels(dashboard(name))
        for target in panel.get("targets", [])
    ]


LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[a-zA-Z_]\w*)\)$")


def variable_selectors() -> list[tuple[str, str, str]]:
    """(dashboard name, variable name, PromQL selector) of every `label_values(selector, label)` variable."""
    out = []
    for name in DASHBOARD_NAMES:
        for var in dashboard(name)["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
            match = LABEL_VALUES.match(query)
            assert match, f"{name}: variable {var['name']}: not label_values(selector, label): {query}"
            out.append((name, var["name"], match["selector"]))
    return out


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


GRAFANA_RANGES = {"__rate_interval": "1m", "__interval": "1m", "__range": "5m"}


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """`expr` as Grafana sends it: `$__rate_interval`, `$__range` (a short range, as in a test) and the dashboard's
    variables (default `.*`, what All means for a multi-value variable) replaced, in `$x` and `${x}` forms."""
    values = {**GRAFANA_RANGES, **(variables or {})}

    def repl(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"]
        return values.get(name, ".*")

    return re.sub(r"\$(?:\{(?P<braced>\w+)\}|(?P<plain>\w+))", repl, expr)


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS |= {"inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: identifiers that are neither functions, aggregations, keywords nor labels
    (label matchers, grouping lists, strings and ranges are removed first). `{__name__=...}` selectors are refused."""
    assert "__name__" not in expr, f"selects by __name__: {expr}"
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()", text):
        word = match.group(1)
        if word.lower() not in _KEYWORDS:
            names.add(word)
    return names


def _series_names(registry: Any) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_module() -> ModuleType:
    """charts/dreambooth-operator/dashboards/build.py (not a package: loaded from its path)."""
    return sys.modules.get("dreambooth_chart_dashboards") or _load(
        CHART / "dashboards" / "build.py", "dreambooth_chart_dashboards"
    )


@cache
def exported_metric_names() -> frozenset[str]:
    """Every series name the operator, the trainer and the sampling server register (with the _total, _bucket, _sum,
    _count suffixes Prometheus sees)."""
    from prometheus_client import REGISTRY

    import dreambooth_trainer.serving.metrics as serve_metrics
    from dreambooth_operator.metrics import OperatorMetrics
    from dreambooth_trainer.progress import Metrics as TrainerMetrics

    names = _series_names(OperatorMetrics().registry) | _series_names(TrainerMetrics("j", "ns", 0).registry)
    # The sampling server registers its metrics in prometheus_client's default registry when its module is imported.
    assert serve_metrics is not None
    names |= {n for n in _series_names(REGISTRY) if n.startswith("dreambooth_serve_")}
    return frozenset(names)

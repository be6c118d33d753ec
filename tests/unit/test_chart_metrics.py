"""The chart's dashboard and alerts use only metric names that the operator and the trainer really export,
and the chart's defaults agree with the code (image repository, version, ports)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from dreambooth_api.constants import IMAGE_REPOSITORY
from dreambooth_operator import settings
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_trainer.progress import Metrics as TrainerMetrics

CHART = Path(__file__).resolve().parents[2] / "charts" / "dreambooth-operator"
METRIC = re.compile(r"\bdreambooth_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def _series_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


EXPORTED = _series_names(OperatorMetrics().registry) | _series_names(TrainerMetrics("j", "ns", 0).registry)


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads((CHART / "files" / "dashboard.json").read_text())
    return dashboard


def _dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in _dashboard()["templating"]["list"] if "definition" in v]
    return exprs


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_exported_names_are_what_the_code_registers() -> None:
    # A sanity check of the collector above: names of both prefixes, with the Prometheus suffixes.
    assert "dreambooth_operator_restarts_total" in EXPORTED
    assert "dreambooth_operator_time_to_running_seconds_bucket" in EXPORTED
    assert "dreambooth_trainer_step" in EXPORTED
    assert "dreambooth_operator_restarts" not in EXPORTED


@pytest.mark.parametrize("expr", _dashboard_exprs())
def test_dashboard_queries_use_exported_metrics(expr: str) -> None:
    used = set(METRIC.findall(expr))
    assert used, f"query uses no dreambooth metric: {expr}"
    assert used <= EXPORTED, f"unknown metrics {used - EXPORTED} in {expr}"


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda r: r["alert"])
def test_alerts_use_exported_metrics_and_are_documented(rule: dict[str, Any]) -> None:
    used = set(METRIC.findall(rule["expr"]))
    assert used
    assert used <= EXPORTED, f"unknown metrics {used - EXPORTED}"
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["annotations"]["summary"]
    assert rule["annotations"]["description"]


def test_dashboard_covers_the_required_views() -> None:
    panels = {p["title"]: p for p in _dashboard()["panels"] if p["type"] != "row"}
    text = json.dumps(list(panels.values()))
    for metric in (
        "dreambooth_operator_jobs",  # jobs by phase
        "dreambooth_trainer_step",  # progress
        "dreambooth_trainer_loss",  # loss
        "dreambooth_trainer_phase",  # trainer (GPU) minutes
        "dreambooth_operator_restarts_total",  # restarts by reason
        "dreambooth_operator_time_to_running_seconds_bucket",  # time to Running
    ):
        assert metric in text, metric
    assert all(p.get("description") for p in panels.values())
    ids = [p["id"] for p in _dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_alerts_cover_the_required_conditions() -> None:
    names = {r["alert"] for r in _alert_rules()}
    assert {
        "DreamBoothJobsFailing",
        "DreamBoothJobsStuckPending",
        "DreamBoothPreemptionStorm",
        "DreamBoothOperatorReconcileErrors",
    } <= names


def test_chart_defaults_agree_with_the_code() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == settings.VERSION
    assert values["image"]["repository"] == f"{IMAGE_REPOSITORY}/operator"
    assert values["trainer"]["image"]["repository"] == f"{IMAGE_REPOSITORY}/trainer"
    assert values["metrics"]["port"] == settings.OPERATOR_METRICS_PORT
    assert values["health"]["port"] == settings.OPERATOR_HEALTH_PORT
    assert values["podSecurityContext"]["runAsNonRoot"] is True

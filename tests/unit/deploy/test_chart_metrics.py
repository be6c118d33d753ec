"""The chart's dashboards and alerts use only metric names that the operator, the trainer and the sampling server
really register (or that are listed as pending, with the module that will export them), every expression is valid
PromQL (promtool parses it), and the chart's defaults agree with the code (image repository, version, ports)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dreambooth_api.constants import IMAGE_REPOSITORY
from dreambooth_operator import settings
from tests.chart_queries import (
    CHART,
    PENDING_METRICS,
    alert_rules,
    exported_metric_names,
    metric_names,
    panel_queries,
    substitute,
    variable_selectors,
)
from tests.infra.prometheus import run_promtool

EXPORTED = exported_metric_names()
KNOWN = EXPORTED | set(PENDING_METRICS)
QUERIES = panel_queries()


def test_exported_names_are_what_the_code_registers() -> None:
    # A sanity check of the collector: names of the three prefixes, with the Prometheus suffixes.
    assert "dreambooth_operator_restarts_total" in EXPORTED
    assert "dreambooth_operator_time_to_running_seconds_bucket" in EXPORTED
    assert "dreambooth_trainer_step" in EXPORTED
    assert "dreambooth_serve_requests_total" in EXPORTED
    assert "dreambooth_operator_restarts" not in EXPORTED


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (phase) (dreambooth_operator_jobs{phase=~"Pending|Queued"})', {"dreambooth_operator_jobs"}),
        (
            'histogram_quantile(0.95, sum by (le, job) (rate(x_seconds_bucket{job="a"}[$__rate_interval])))',
            {"x_seconds_bucket"},
        ),
        ("max by (namespace, job) (a) == 1 unless on (namespace, job) changes(b[15m]) > 0", {"a", "b"}),
        ("sum(rate(a[5m])) / sum(rate(b[5m])) > 0.05 and sum(c) > 1e-3", {"a", "b", "c"}),
        ("absent(a) or vector(0)", {"a"}),
        ("sum_over_time((sum by (job, rank) (a))[$__range:1m]) offset 5m", {"a"}),
    ],
)
def test_metric_names_are_parsed_out_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize(("dashboard", "title", "expr"), QUERIES, ids=[f"{d}:{t}" for d, t, _ in QUERIES])
def test_dashboard_queries_use_exported_metrics(dashboard: str, title: str, expr: str) -> None:
    used = metric_names(expr)
    assert used, f"query uses no metric: {expr}"
    assert used <= KNOWN, f"{dashboard}/{title}: unknown metrics {used - KNOWN} in {expr}"


@pytest.mark.parametrize(("dashboard", "variable", "selector"), variable_selectors())
def test_dashboard_variables_use_exported_metrics(dashboard: str, variable: str, selector: str) -> None:
    used = metric_names(selector)
    assert len(used) == 1
    assert used <= KNOWN, f"{dashboard} ${variable}: unknown metric {used}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alerts_use_exported_metrics(rule: dict[str, object]) -> None:
    used = metric_names(str(rule["expr"]))
    assert used
    assert used <= KNOWN, f"unknown metrics {used - KNOWN}"


def test_pending_metric_names_are_all_still_used() -> None:
    used = {n for _, _, e in QUERIES for n in metric_names(e)} | {
        n for r in alert_rules() for n in metric_names(r["expr"])
    }
    assert set(PENDING_METRICS) <= used, f"listed as pending but not used: {set(PENDING_METRICS) - used}"


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query and variable selector (as recording rules, Grafana's variables
    substituted) and every alert (the rule file itself)."""
    exprs = [substitute(e) for _, _, e in QUERIES] + [substitute(s) for _, _, s in variable_selectors()]
    rules = {
        "groups": [{"name": "dashboards", "rules": [{"record": f"q:{i}", "expr": e} for i, e in enumerate(exprs)]}]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    checked = run_promtool("check", "rules", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout
    alerts = run_promtool("check", "rules", CHART / "files" / "alerts.yaml")
    assert alerts.returncode == 0, alerts.stdout + alerts.stderr


def test_chart_defaults_agree_with_the_code() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == settings.VERSION
    assert values["image"]["repository"] == f"{IMAGE_REPOSITORY}/operator"
    assert values["trainer"]["image"]["repository"] == f"{IMAGE_REPOSITORY}/trainer"
    assert values["metrics"]["port"] == settings.OPERATOR_METRICS_PORT
    assert values["health"]["port"] == settings.OPERATOR_HEALTH_PORT
    assert values["podSecurityContext"]["runAsNonRoot"] is True

"""Prometheus fixture: it scrapes a real exporter, evaluates rules, and promtool checks metrics and rules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

from tests.infra.fixtures import PrometheusFactory
from tests.infra.processes import free_port
from tests.infra.prometheus import run_promtool

RULES = {
    "groups": [
        {
            "name": "dbo-test",
            "rules": [
                {"record": "job:dbo_test_requests:total", "expr": "sum by (job) (dbo_test_requests_total)"},
                {
                    "alert": "DboTestManyRequests",
                    "expr": "dbo_test_requests_total > 2",
                    "labels": {"severity": "info"},
                    "annotations": {"summary": "more than two requests"},
                },
            ],
        }
    ]
}


@pytest.fixture
def exporter() -> Iterator[tuple[str, CollectorRegistry]]:
    """A prometheus_client exporter on a free loopback port: (host:port, its registry)."""
    registry = CollectorRegistry()
    requests = Counter("dbo_test_requests", "Requests handled.", registry=registry)
    queue = Gauge("dbo_test_queue_depth", "Items waiting.", registry=registry)
    requests.inc(3)
    queue.set(7)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}", registry
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_prometheus_scrapes_the_exporter(
    prometheus: PrometheusFactory, exporter: tuple[str, CollectorRegistry]
) -> None:
    target, _ = exporter
    server = prometheus(targets=[target], job="app")

    result = server.wait_for('dbo_test_requests_total{job="app"}', lambda r: len(r) == 1, timeout=60)
    assert float(result[0]["value"][1]) == 3.0
    assert result[0]["metric"]["instance"] == target
    gauge = server.query("dbo_test_queue_depth")
    assert [float(s["value"][1]) for s in gauge] == [7.0]
    assert [t["health"] for t in server.targets()] == ["up"]


def test_promtool_accepts_the_exporter_output(exporter: tuple[str, CollectorRegistry]) -> None:
    _, registry = exporter
    result = run_promtool("check", "metrics", input=generate_latest(registry).decode())
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_metrics_flags_bad_names() -> None:
    exposition = "# HELP requests Requests.\n# TYPE requests counter\nrequests 1\n"
    result = run_promtool("check", "metrics", input=exposition)
    assert result.returncode != 0
    assert "_total" in result.stdout + result.stderr


def test_rule_file_passes_promtool_and_prometheus_evaluates_it(
    prometheus: PrometheusFactory, exporter: tuple[str, CollectorRegistry], tmp_path: Path, promtool: Path
) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(json.dumps(RULES, indent=2))
    checked = run_promtool("check", "rules", rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert promtool.name == "promtool"

    target, _ = exporter
    server = prometheus(targets=[target], job="app", rule_files=[rules])
    recorded = server.wait_for('job:dbo_test_requests:total{job="app"}', timeout=60)
    assert float(recorded[0]["value"][1]) == 3.0
    alert_states = server.wait_for('ALERTS{alertname="DboTestManyRequests", alertstate="firing"}', timeout=60)
    assert alert_states[0]["metric"]["severity"] == "info"


def test_promtool_rejects_a_broken_rule_file(tmp_path: Path) -> None:
    rules = tmp_path / "broken.yml"
    rules.write_text(json.dumps({"groups": [{"name": "g", "rules": [{"record": "x", "expr": "sum(("}]}]}))
    result = run_promtool("check", "rules", rules)
    assert result.returncode != 0

"""The chart's Grafana dashboards: built by dashboards/build.py with the typed grafana-foundation-sdk (the committed
files are exactly its output), every panel with a unit and a description, unique ids and uids, the data source as a
variable, the views the issue asks for, and one ConfigMap each for Grafana's sidecar."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.chart_queries import CHART, DASHBOARD_NAMES, ROOT, build_module, dashboard, helm_path, panels, render_chart

BUILD = build_module()


@pytest.mark.parametrize("spec", BUILD.SPECS, ids=lambda s: s.name)
def test_committed_dashboards_are_what_the_builder_writes(spec: Any) -> None:
    committed = BUILD.path(spec).read_text()
    assert committed == BUILD.render(spec), f"{BUILD.path(spec).name} is stale: run make dashboards"


def test_builder_check_mode_reports_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in BUILD.SPECS:
        (tmp_path / BUILD.path(spec).name).write_text(BUILD.render(spec))
    monkeypatch.setattr(BUILD, "FILES", tmp_path)
    assert BUILD.main(["--check"]) == 0
    (tmp_path / "dashboard-job.json").write_text("{}\n")
    assert BUILD.main(["--check"]) == 1
    assert BUILD.main([]) == 0  # rewrites it
    assert BUILD.main(["--check"]) == 0


def test_the_builder_is_a_dev_tool_outside_the_packaged_chart(tmp_path: Path) -> None:
    ignored = (CHART / ".helmignore").read_text().splitlines()
    assert "dashboards/" in ignored
    subprocess.run(
        [helm_path(), "package", str(CHART), "-d", str(tmp_path)], check=True, capture_output=True, timeout=60
    )
    (package,) = tmp_path.glob("*.tgz")
    listing = subprocess.run(["tar", "tzf", str(package)], check=True, capture_output=True, text=True).stdout
    assert "dashboards/build.py" not in listing
    assert all(f"files/dashboard-{name}.json" in listing for name in DASHBOARD_NAMES)
    for pyproject in ("operator/pyproject.toml", "trainer/pyproject.toml", "api/pyproject.toml"):
        assert "grafana" not in (ROOT / pyproject).read_text()
    assert "grafana-foundation-sdk==" in (ROOT / "requirements" / "dev.in").read_text()


def test_uids_are_unique_and_stable() -> None:
    uids = [dashboard(name)["uid"] for name in DASHBOARD_NAMES]
    assert uids == ["dreambooth-fleet", "dreambooth-job", "dreambooth-inference"]


@pytest.mark.parametrize("name", DASHBOARD_NAMES)
def test_every_panel_has_a_unit_a_description_and_the_datasource_variable(name: str) -> None:
    doc = dashboard(name)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    for panel in panels(doc):
        title = panel["title"]
        assert panel["description"].strip(), f"{name}/{title}: no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{name}/{title}: no unit"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], f"{name}/{title}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", title
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}", var["name"]


def _text(name: str) -> str:
    return json.dumps(panels(dashboard(name)))


def test_fleet_dashboard_covers_its_views() -> None:
    titles = {p["title"] for p in panels(dashboard("fleet"))}
    for title in (
        "Jobs by phase",
        "Queue wait (creation to Running)",
        "Running GPUs (training pods)",
        "Aggregate steps/s",
        "Preemptions per hour",
        "Failures by reason (in range)",
        "GPU-minutes per subject (in range)",
    ):
        assert title in titles
    text = _text("fleet")
    for metric in (
        "dreambooth_operator_jobs",
        "dreambooth_operator_time_to_running_seconds_bucket",
        "dreambooth_trainer_phase",
        "dreambooth_trainer_steps_per_second",
        'dreambooth_operator_restarts_total{reason=\\"preemption\\"}[1h]',
        "dreambooth_operator_events_total",
    ):
        assert metric in text, metric


def test_job_dashboard_is_templated_by_namespace_and_job() -> None:
    doc = dashboard("job")
    variables = [v["name"] for v in doc["templating"]["list"]]
    assert variables == ["datasource", "namespace", "job"]
    for panel in panels(doc):
        for target in panel["targets"]:
            if "dreambooth_trainer_" in target["expr"]:
                assert 'namespace="$namespace"' in target["expr"], panel["title"]
                assert 'job="$job"' in target["expr"], panel["title"]
    titles = {p["title"] for p in panels(doc)}
    for title in ("Loss", "Learning rate", "Steps/s and images/s", "ETA", "Checkpoint duration", "Checkpoint size"):
        assert title in titles
    assert {
        "GPU memory",
        "Restarts (trainer processes in range)",
        "Evaluation scores (jobs evaluated in range)",
    } <= titles


def test_inference_dashboard_covers_its_views() -> None:
    titles = {p["title"] for p in panels(dashboard("inference"))}
    assert {
        "Request rate by code",
        "Latency p50, p95, p99",
        "Batch size",
        "Queue depth and in flight",
        "Errors",
        "Adapter loads, hits, evictions",
        "Adapter hit ratio",
    } <= titles
    latency = next(p for p in panels(dashboard("inference")) if p["title"] == "Latency p50, p95, p99")
    assert [t["expr"].split(",")[0] for t in latency["targets"]] == [
        "histogram_quantile(0.5",
        "histogram_quantile(0.95",
        "histogram_quantile(0.99",
    ]


def test_each_dashboard_ships_as_a_configmap_for_the_grafana_sidecar() -> None:
    maps = {d["metadata"]["name"]: d for d in render_chart() if d["kind"] == "ConfigMap"}
    for name in DASHBOARD_NAMES:
        cm = maps[f"dbo-dreambooth-operator-dashboard-{name}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == "ops"
        (key,) = cm["data"]
        assert key == f"dreambooth-{name}.json"
        assert json.loads(cm["data"][key]) == dashboard(name)
    moved = render_chart(
        "--set=dashboards.namespace=monitoring", '--set-json=dashboards.annotations={"grafana_folder":"DreamBooth"}'
    )
    moved_maps = [d for d in moved if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]]
    assert len(moved_maps) == len(DASHBOARD_NAMES)
    for cm in moved_maps:
        assert cm["metadata"]["namespace"] == "monitoring"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "DreamBooth"}
    off = render_chart("--set=dashboards.enabled=false")
    assert not [d for d in off if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]]


def test_the_dashboards_count_the_phases_the_trainer_counts_as_holding_the_gpu() -> None:
    from dreambooth_trainer.progress import ACTIVE_PHASES

    phases = sys.modules["dash_model"].ACTIVE_PHASES.split("|")  # loaded by build.py (BUILD, above)
    assert sorted(phases) == sorted(p.value for p in ACTIVE_PHASES)

"""The chart with helm alone: `helm lint --strict` passes for each meaningful values combination, values.schema.json
rejects bad values with a message that names the value and what is wrong, and NOTES.txt tells the next commands.
(The server-side dry-run of the same combinations under Pod Security "restricted" is
tests/integration/test_chart_quality.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.chart_queries import CHART, VALUE_COMBINATIONS, helm_path, value_combination


def helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_path(), *(str(a) for a in args)], capture_output=True, text=True, check=False, timeout=120
    )


@pytest.mark.parametrize("name", VALUE_COMBINATIONS)
def test_helm_lint_strict(name: str) -> None:
    result = helm("lint", "--strict", CHART, *value_combination(name, "team-a"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            ["--set=dashboards.labels.grafana_dashboard=1"],
            "at '/dashboards/labels/grafana_dashboard': got number, want string",
        ),
        (["--set=dashboards.enable=true"], "at '/dashboards': additional properties 'enable' not allowed"),
        (["--set=dashboards.namespace=Monitoring"], "at '/dashboards/namespace'"),
        (["--set=prometheusRule.labels.release=true"], "at '/prometheusRule/labels/release': got boolean, want string"),
        (["--set=prometheusRule.enabeld=true"], "at '/prometheusRule': additional properties 'enabeld' not allowed"),
        (
            ["--set-string=metrics.trainerPodMonitor.interval=15sec"],
            "at '/metrics/trainerPodMonitor/interval': '15sec' does not match pattern",
        ),
        (
            ["--set=metrics.serviceMonitor.interval=30"],
            "at '/metrics/serviceMonitor/interval': got number, want string",
        ),
        (["--set=metrics.port=70000"], "at '/metrics/port': maximum: got 70,000, want 65,535"),
        (["--set=logFormat=xml"], "at '/logFormat': value must be one of 'json', 'plain', 'full'"),
        (["--set=replicas=0"], "at '/replicas': minimum: got 0, want 1"),
    ],
)
def test_values_schema_rejects_bad_values_with_a_clear_message(values: list[str], message: str) -> None:
    result = helm("template", "x", CHART, *values)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr
    linted = helm("lint", "--strict", CHART, *values)
    assert linted.returncode != 0
    assert message in linted.stdout + linted.stderr


def _notes(tmp_path: Path, *values: str) -> str:
    """NOTES.txt as `helm install` prints it: `helm template` skips NOTES.txt, so a copy of the chart renders it
    through `tpl` from a template of its own."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text('notes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n')
    result = helm(
        "template", "dbo", chart, "--namespace", "dreambooth-system", "--show-only", "templates/zz-notes.yaml", *values
    )
    assert result.returncode == 0, result.stderr
    notes: str = yaml.safe_load(result.stdout)["notes"]
    return notes


def test_notes_tell_the_next_commands(tmp_path: Path) -> None:
    notes = _notes(tmp_path)
    assert "kubectl rollout status deployment/dbo-dreambooth-operator -n dreambooth-system" in notes
    assert "kubectl apply -n default -f " in notes
    assert "examples/minimal-job.yaml" in notes
    assert "kubectl get dbj -n default -w" in notes
    assert "dreambooth watch minimal -n default" in notes
    assert "dreambooth logs minimal -n default" in notes
    assert "set metrics.trainerPodMonitor.enabled=true" in notes
    assert "Alerts are off: set prometheusRule.enabled=true" in notes
    assert "DreamBooth / Fleet, DreamBooth / Job, DreamBooth / Inference" in notes
    # The job's name in the commands is the example's.
    example = yaml.safe_load((CHART.parents[1] / "examples" / "minimal-job.yaml").read_text())
    assert example["metadata"]["name"] == "minimal"


def test_notes_follow_the_values(tmp_path: Path) -> None:
    notes = _notes(tmp_path, *value_combination("monitoring", "team-a"), "--set=watchNamespaces={team-a,team-b}")
    assert "It watches the namespaces team-a, team-b." in notes
    assert "kubectl get dbj -n team-a -w" in notes
    assert "dreambooth watch minimal -n team-a" in notes
    assert "PodMonitor dbo-dreambooth-operator-workloads scrapes training and serving pods." in notes
    assert "Alerts: PrometheusRule dbo-dreambooth-operator; each alert links its entry in docs/runbook.md." in notes

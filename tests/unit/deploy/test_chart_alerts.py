"""The chart's alerts (files/alerts.yaml): promtool checks them and runs their unit tests (promtool/alerts_test.yaml),
which have a firing and a quiet case for every alert; every alert has a severity, a summary, a description and a
runbook_url that points at its entry in docs/runbook.md (what it means, how to confirm, what to do)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.chart_queries import CHART, ROOT, alert_rules, render_chart
from tests.infra.prometheus import run_promtool

RULES = alert_rules()
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/dreambooth-operator/dreambooth-operator/blob/main/docs/runbook.md#"


def _runbook_entries() -> dict[str, str]:
    """Anchor (GitHub's slug of the `## heading`) -> the entry's text."""
    entries: dict[str, str] = {}
    for block in re.split(r"^## ", RUNBOOK.read_text(), flags=re.MULTILINE)[1:]:
        heading, _, body = block.partition("\n")
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        entries[slug] = body
    return entries


def test_promtool_checks_the_rules_and_passes_their_unit_tests() -> None:
    checked = run_promtool("check", "rules", CHART / "files" / "alerts.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(RULES)} rules found" in checked.stdout
    tested = run_promtool("test", "rules", CHART / "promtool" / "alerts_test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    doc = yaml.safe_load((CHART / "promtool" / "alerts_test.yaml").read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {r["alert"] for r in RULES}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


def test_the_issue_alerts_are_there() -> None:
    names = {r["alert"] for r in RULES}
    assert {
        "DreamBoothJobsFailing",
        "DreamBoothJobsStuckPending",
        "DreamBoothPreemptionStorm",
        "DreamBoothOperatorReconcileErrors",
        "DreamBoothCheckpointUploadsFailing",
        "DreamBoothTrainingStalled",
        "DreamBoothOperatorDown",
        "DreamBoothServingErrors",
        "DreamBoothServingLatencyHigh",
        "DreamBoothEvaluationScoreLow",
    } <= names
    assert len(names) == len(RULES)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r["alert"])
def test_every_alert_is_documented_and_has_a_runbook_entry(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"warning", "critical"}
    annotations = rule["annotations"]
    assert annotations["summary"]
    assert annotations["description"]
    url = annotations["runbook_url"]
    assert url == RUNBOOK_URL + rule["alert"].lower()
    entries = _runbook_entries()
    anchor = url.rpartition("#")[2]
    assert anchor in entries, f"docs/runbook.md has no '## {rule['alert']}'"
    body = entries[anchor]
    for part in ("**Meaning.**", "**Confirm.**", "**Act.**"):
        assert part in body, f"{rule['alert']}: runbook entry without {part}"


def test_the_runbook_has_no_entry_without_an_alert() -> None:
    assert set(_runbook_entries()) == {r["alert"].lower() for r in RULES}


def test_the_prometheus_rule_object_is_the_alert_file() -> None:
    rendered = render_chart("--set=prometheusRule.enabled=true", "--set=prometheusRule.labels.release=kps")
    (rule,) = [d for d in rendered if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["metadata"]["labels"]["release"] == "kps"

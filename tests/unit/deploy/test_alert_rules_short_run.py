"""tests/alert_rules.py: the chart's alerts shortened for an e2e run keep their expressions but for the windows and
the named thresholds, and refuse what would leave an alert long or a replacement ambiguous."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.alert_rules import short_run_rules, shorten
from tests.chart_queries import alert_rules
from tests.infra.prometheus import run_promtool

pytestmark = pytest.mark.unit

RANGES = {"5m": "20s", "10m": "30s", "15m": "30s", "30m": "1m", "1h": "5m", "6h": "5m"}


def test_windows_and_subqueries_are_replaced() -> None:
    assert (
        shorten("rate(x[5m]) > 1 and max_over_time(y[1h:1m])", RANGES) == "rate(x[20s]) > 1 and max_over_time(y[5m:1m])"
    )


def test_a_window_without_a_short_form_is_refused() -> None:
    with pytest.raises(KeyError, match=r"\[2d\]"):
        shorten("rate(x[2d])", RANGES)


def test_a_threshold_must_match_exactly_once() -> None:
    assert shorten("a > 10", RANGES, {"> 10": "> 0"}) == "a > 0"
    with pytest.raises(ValueError, match="occurs 0 times"):
        shorten("a > 10", RANGES, {"> 20": "> 0"})
    with pytest.raises(ValueError, match="occurs 2 times"):
        shorten("a > 10 and b > 10", RANGES, {"> 10": "> 0"})


def test_every_chart_alert_shortens_and_promtool_accepts_the_file(tmp_path: Path) -> None:
    names = [rule["alert"] for rule in alert_rules()]
    doc = short_run_rules(names, RANGES)
    (group,) = doc["groups"]
    assert [r["alert"] for r in group["rules"]] == names
    assert all("for" not in r for r in group["rules"])
    assert all(r["labels"] == o.get("labels") for r, o in zip(group["rules"], alert_rules(), strict=True))
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(doc))
    checked = run_promtool("check", "rules", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_unknown_alerts_and_stray_thresholds_are_refused() -> None:
    with pytest.raises(KeyError, match="NoSuchAlert"):
        short_run_rules(["NoSuchAlert"], RANGES)
    with pytest.raises(KeyError, match="DreamBoothOperatorDown"):
        short_run_rules(["DreamBoothJobsFailing"], RANGES, {"DreamBoothOperatorDown": {"5m": "1m"}})


def test_holds_shorten_every_for_and_refuse_a_missing_one() -> None:
    holds = {"5m": "2s", "10m": "3s", "15m": "4s", "30m": "5s"}
    (group,) = short_run_rules([rule["alert"] for rule in alert_rules()], RANGES, holds=holds)["groups"]
    waits = {r["alert"]: r.get("for") for r in group["rules"]}
    assert waits == {r["alert"]: holds[r["for"]] if "for" in r else None for r in alert_rules()}
    with pytest.raises(KeyError, match="DreamBoothJobsFailing"):
        short_run_rules(["DreamBoothJobsFailing"], RANGES, holds={"10m": "3s"})

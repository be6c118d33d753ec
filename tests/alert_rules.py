"""The chart's alerts (files/alerts.yaml) shortened for an e2e run, and whether Prometheus ever fired one.

An alert watches hours (`[1h]`, `[6h]`) and waits minutes (`for: 15m`); an e2e run lasts a few minutes. To prove on a
real run that each alert's metric names, labels, joins and arithmetic match what the operator, the trainers and the
sampling servers export, the e2e tests load the chart's own rules into the run's Prometheus with:

- `for` dropped (promtool's unit tests, promtool/alerts_test.yaml, check every `for` and threshold), or shortened as
  `holds` says (one mapping for the whole file, like `ranges`): a short window alone makes a stall or an absence hold
  for a moment where the chart's `for` would wait (a step that takes a second longer than usual), so a run that
  asserts an alert never fired for a healthy job keeps a short `for` and asks `fired(..., state="firing")`;
- each range window replaced as `ranges` says (one mapping for the whole file, so every alert is shortened alike);
- the thresholds a short run cannot reach (ten preemptions, twenty seconds of latency) replaced, each replacement
  named with its reason by the caller; each must match the expression exactly once.

Prometheus then evaluates the rules as it would in a cluster (every `evaluation_interval`) and records each pending or
firing alert in its `ALERTS` series, so `fired` can ask, after the run, whether an alert ever held during it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.chart_queries import alert_rules


def shorten(expr: str, ranges: Mapping[str, str], thresholds: Mapping[str, str] | None = None) -> str:
    """`expr` with its `[window]`s (also `[window:step]` subqueries) replaced by `ranges` and each `thresholds`
    text replaced (it must occur exactly once). A window missing from `ranges` is an error: nothing stays long."""

    def window(match: re.Match[str]) -> str:
        inner = match[1]
        head, sep, step = inner.partition(":")
        if head not in ranges:
            raise KeyError(f"no short window for [{inner}] in {expr!r}")
        return f"[{ranges[head]}{sep}{step}]"

    out = re.sub(r"\[([^\[\]]+)\]", window, expr)
    for old, new in (thresholds or {}).items():
        count = out.count(old)
        if count != 1:
            raise ValueError(f"{old!r} occurs {count} times in {out!r}, not once")
        out = out.replace(old, new)
    return out


def short_run_rules(
    alerts: Collection[str],
    ranges: Mapping[str, str],
    thresholds: Mapping[str, Mapping[str, str]] | None = None,
    holds: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A rules document with the chart's `alerts` (by name; each must exist), shortened (see the module docstring):
    each `for` dropped, or replaced by `holds[for]` when `holds` is given (a `for` missing from it is an error)."""
    rules = {rule["alert"]: rule for rule in alert_rules()}
    unknown = set(alerts) - set(rules)
    if unknown:
        raise KeyError(f"not alerts of the chart: {sorted(unknown)}")
    thresholds = thresholds or {}
    unused = set(thresholds) - set(alerts)
    if unused:
        raise KeyError(f"thresholds for alerts not loaded: {sorted(unused)}")
    out = []
    for name in alerts:
        rule = {k: v for k, v in rules[name].items() if k != "for"}
        if holds is not None and "for" in rules[name]:
            wait = rules[name]["for"]
            if wait not in holds:
                raise KeyError(f"no short `for` for {wait!r} of {name}")
            rule = {**rule, "for": holds[wait]}
        rule["expr"] = shorten(rule["expr"], ranges, thresholds.get(name, {}))
        out.append(rule)
    return {"groups": [{"name": "dreambooth-operator-short-run", "interval": "1s", "rules": out}]}


def write_short_run_rules(
    path: Path,
    alerts: Collection[str],
    ranges: Mapping[str, str],
    thresholds: Mapping[str, Mapping[str, str]] | None = None,
    holds: Mapping[str, str] | None = None,
) -> Path:
    path.write_text(yaml.safe_dump(short_run_rules(alerts, ranges, thresholds, holds), sort_keys=False))
    return path


def fired(prom: Any, alert: str, within: str = "1h", state: str | None = None) -> dict[str, str] | None:
    """The labels of one `ALERTS` sample of `alert` (pending or firing; only `state` if given) in the last `within`,
    else None."""
    return next(iter(fired_all(prom, alert, within, state)), None)


def fired_all(prom: Any, alert: str, within: str = "1h", state: str | None = None) -> list[dict[str, str]]:
    """The labels of every `ALERTS` series of `alert` (pending or firing; only `state` if given) in the last
    `within`: one per label set the alert held for (a job, a namespace)."""
    selector = f'alertname="{alert}"' + (f', alertstate="{state}"' if state else "")
    result = prom.query(f"max_over_time(ALERTS{{{selector}}}[{within}])")
    return [dict(sample["metric"]) for sample in result]

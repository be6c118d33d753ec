"""The chart's Grafana dashboards, written with the typed builder of `grafana-foundation-sdk` (a dev tool: not in
the packaged chart, never an operator or trainer dependency).

`make dashboards` (this file run as a script) writes `files/dashboard-<name>.json` for the three dashboards, each
defined in its own module next to this one (`dash_fleet`, `dash_job`, `dash_inference`; shared parts in `dash_model`):

- `fleet`: every job at once (jobs by phase, queue wait, running training pods, aggregate steps/s, preemptions per
  hour, failures by reason, GPU-minutes per subject, the operator's own health);
- `job`: one DreamBoothJob, templated by namespace and job (loss, learning rate, steps/s, ETA, checkpoint duration
  and size, GPU memory, restarts, evaluation scores);
- `inference`: the sampling servers (request rate, latency p50/p95/p99, batch size, queue depth, errors, adapter
  loads and hits).

`--check` writes nothing and exits 1 when a committed file differs from what this file builds (`make verify` and
tests/unit/test_chart_dashboards.py). Every panel has a unit and a description, every query names only metrics the
operator, the trainer and the sampling server export (docs/contracts.md; the unit tests compare them with the
registries), and the data source is the `datasource` variable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, stat, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueGraphMode,
    BigValueTextMode,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    StackingMode,
    TooltipDisplayMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import DashboardLinkType, DataSourceRef, VariableRefresh, VariableSort

CHART = Path(__file__).resolve().parents[1]
FILES = CHART / "files"
TAGS = ["dreambooth"]
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")


# The dashboards are defined in the dash_* modules next to this file (this file runs as a script, and the tests load
# it from its path: its folder goes first on the module path so that they import the same way both times).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dash_fleet import FLEET  # noqa: E402
from dash_inference import INFERENCE  # noqa: E402
from dash_job import JOB  # noqa: E402
from dash_model import P, Spec  # noqa: E402

SPECS = (FLEET, JOB, INFERENCE)

PanelBuilder = timeseries.Panel | stat.Panel | bargauge.Panel


def _panel(spec: P, panel_id: int) -> PanelBuilder:
    builder: PanelBuilder
    if spec.kind == "timeseries":
        ts = (
            timeseries.Panel()
            .legend(
                cb.VizLegendOptions()
                .show_legend(True)
                .display_mode(LegendDisplayMode.LIST)
                .placement(LegendPlacement.BOTTOM)
            )
            .tooltip(cb.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING))
            .fill_opacity(10)
        )
        if spec.stacked:
            ts = ts.stacking(cb.StackingConfig().mode(StackingMode.NORMAL))
        builder = ts
    elif spec.kind == "stat":
        builder = (
            stat.Panel()
            .graph_mode(BigValueGraphMode.NONE)
            .text_mode(BigValueTextMode.NAME if spec.show_name else BigValueTextMode.AUTO)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
    elif spec.kind == "bargauge":
        builder = (
            bargauge.Panel()
            .orientation(VizOrientation.HORIZONTAL)
            .display_mode(BarGaugeDisplayMode.GRADIENT)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
    else:
        raise ValueError(f"unknown panel kind {spec.kind!r}")
    builder = (
        builder.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .unit(spec.unit)
        .datasource(DATASOURCE)
        .span(spec.w)
        .height(spec.h)
    )
    for index, q in enumerate(spec.queries):
        target = prom.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(chr(ord("A") + index))
        target = target.datasource(DATASOURCE)
        builder = builder.with_target(target.instant() if q.instant else target.range())
    return builder


def build(spec: Spec) -> dict[str, Any]:
    """The dashboard as the JSON document Grafana imports."""
    dashboard = (
        db.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(TAGS)
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .link(
            db.DashboardLink("DreamBooth")
            .type(DashboardLinkType.DASHBOARDS)
            .tags(TAGS)
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for var in spec.variables:
        variable = (
            db.QueryVariable(var.name)
            .label(var.label)
            .datasource(DATASOURCE)
            .query(var.query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
        )
        if var.multi:
            variable = variable.multi(True).include_all(True).all_value(".*")
        dashboard = dashboard.with_variable(variable)
    panel_id = 0
    for row in spec.rows:
        panel_id += 1
        dashboard = dashboard.with_row(db.Row(row.title).id(panel_id))
        for panel in row.panels:
            panel_id += 1
            dashboard = dashboard.with_panel(_panel(panel, panel_id))
    document: dict[str, Any] = json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))
    return document


def render(spec: Spec) -> str:
    """The committed file's text: sorted keys, two-space indent, a final newline."""
    return json.dumps(build(spec), indent=2, sort_keys=True) + "\n"


def path(spec: Spec) -> Path:
    return FILES / f"dashboard-{spec.name}.json"


def _shown(target: Path) -> Path:
    root = CHART.parents[1]
    return target.relative_to(root) if target.is_relative_to(root) else target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs")
    args = parser.parse_args(argv)
    stale = []
    for spec in SPECS:
        text = render(spec)
        target = path(spec)
        if target.exists() and target.read_text() == text:
            continue
        if args.check:
            stale.append(target)
        else:
            target.write_text(text)
            print(f"wrote {_shown(target)}")
    for target in stale:
        print(f"{_shown(target)} differs from dashboards/build.py: run make dashboards")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

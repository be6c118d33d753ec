"""Render a RunData as one self-contained HTML file: inline SVG plots, base64 PNG samples, no external requests.

The top of the page has a fixed layout (LAYOUT) so that a screenshot test can find the plots and the sample grid
at known pixel positions; the variable-length sections (checkpoints, evaluation, config) follow below.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path

from dreambooth_cli.report.data import RunData
from dreambooth_cli.report.svg import Series, ema, line_chart

LOSS_COLOR = "#d62728"
LOSS_TREND_COLOR = "#7f0000"
LR_COLOR = "#1f77b4"


@dataclass(frozen=True)
class Layout:
    """Fixed pixel geometry of the top of the report (CSS pixels, page origin at the top left)."""

    page_width: int = 1200
    header_height: int = 120
    chart_width: int = 580
    chart_height: int = 300
    chart_gap: int = 20
    chart_left: int = 10
    samples_heading_height: int = 40
    samples_label_width: int = 110
    samples_header_height: int = 24
    cell: int = 128
    gap: int = 8

    @property
    def charts_top(self) -> int:
        return self.header_height

    @property
    def loss_chart_box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the loss chart."""
        return (
            self.chart_left,
            self.charts_top,
            self.chart_left + self.chart_width,
            self.charts_top + self.chart_height,
        )

    @property
    def lr_chart_box(self) -> tuple[int, int, int, int]:
        left = self.chart_left + self.chart_width + self.chart_gap
        return (left, self.charts_top, left + self.chart_width, self.charts_top + self.chart_height)

    @property
    def samples_top(self) -> int:
        """Top of the first row of sample images."""
        return self.charts_top + self.chart_height + self.samples_heading_height + self.samples_header_height + self.gap

    def sample_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the sample image at a grid row (a step) and column (prompt, image)."""
        left = self.chart_left + self.samples_label_width + self.gap + column * (self.cell + self.gap)
        top = self.samples_top + row * (self.cell + self.gap)
        return (left, top, left + self.cell, top + self.cell)


LAYOUT = Layout()


def _css(layout: Layout) -> str:
    return f"""
* {{ box-sizing: border-box; }}
body {{ margin: 0; font-family: "DejaVu Sans", Arial, sans-serif; font-size: 13px; color: #222; background: #fff;
  width: {layout.page_width}px; }}
header {{ height: {layout.header_height}px; overflow: hidden; padding: 10px {layout.chart_left}px; margin: 0;
  background: #f4f4f8; border-bottom: 1px solid #ddd; }}
header h1 {{ font-size: 20px; margin: 0 0 6px 0; }}
header .summary span {{ display: inline-block; margin-right: 18px; }}
#charts {{ height: {layout.chart_height}px; margin: 0; padding: 0 0 0 {layout.chart_left}px; display: flex;
  gap: {layout.chart_gap}px; }}
#charts svg {{ flex: none; display: block; }}
.samples-heading {{ height: {layout.samples_heading_height}px; margin: 0; padding: 10px {layout.chart_left}px 0;
  font-size: 16px; font-weight: bold; }}
#samples {{ display: grid; margin: 0 0 0 {layout.chart_left}px; gap: {layout.gap}px;
  grid-auto-rows: {layout.cell}px; }}
#samples .colhead {{ height: {layout.samples_header_height}px; overflow: hidden; white-space: nowrap;
  text-overflow: ellipsis; font-size: 11px; color: #555; }}
#samples .steplabel {{ display: flex; align-items: center; font-weight: bold; }}
#samples img {{ width: {layout.cell}px; height: {layout.cell}px; image-rendering: pixelated; display: block; }}
section {{ padding: 6px {layout.chart_left}px; }}
h2 {{ font-size: 16px; margin: 14px 0 6px; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
pre {{ background: #f7f7f7; padding: 8px; border: 1px solid #ddd; white-space: pre-wrap; }}
.empty {{ color: #888; }}
"""


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _fmt_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _header(run: RunData, title: str) -> str:
    result = run.result
    last = run.metrics[-1] if run.metrics else None
    total = run.config.get("training", {}).get("maxSteps")
    steps = result.get("steps", last.step if last else None)
    final_loss = result.get("finalLoss", last.loss if last else None)
    items = [
        ("status", result.get("status", "running" if run.metrics else "no data")),
        ("steps", f"{_fmt(steps)}/{_fmt(total)}" if total else _fmt(steps)),
        ("final loss", _fmt(final_loss)),
        ("duration", _fmt_duration(result.get("durationSeconds"))),
        ("method", run.config.get("training", {}).get("method", "-")),
    ]
    summary = "".join(f"<span><b>{escape(k)}:</b> {escape(str(v))}</span>" for k, v in items)
    model = result.get("modelUri") or "-"
    return (
        f"<header><h1>{escape(title)}</h1><div class='summary'>{summary}</div>"
        f"<div class='summary'><span><b>model:</b> {escape(str(model))}</span></div>"
        f"<div class='summary'><span><b>generated:</b> "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}</span></div></header>"
    )


def _charts(run: RunData, layout: Layout) -> str:
    loss = [(float(m.step), m.loss) for m in run.metrics if m.loss is not None]
    lr = [(float(m.step), m.lr) for m in run.metrics if m.lr is not None]
    loss_series = [Series("loss", loss, LOSS_COLOR, 1.5, 0.5)] if loss else []
    if len(loss) > 2:
        trend = ema([y for _, y in loss])
        loss_series.append(
            Series("trend (EMA)", [(x, y) for (x, _), y in zip(loss, trend, strict=True)], LOSS_TREND_COLOR)
        )
    loss_svg = line_chart(
        loss_series,
        width=layout.chart_width,
        height=layout.chart_height,
        title="Training loss",
        x_label="step",
        y_label="loss",
        css_id="loss-chart",
    )
    lr_svg = line_chart(
        [Series("learning rate", lr, LR_COLOR)] if lr else [],
        width=layout.chart_width,
        height=layout.chart_height,
        title="Learning rate",
        x_label="step",
        y_label="lr",
        css_id="lr-chart",
    )
    return f"<div id='charts'>{loss_svg}{lr_svg}</div>"


def _samples(run: RunData, layout: Layout) -> str:
    heading = "<div class='samples-heading'>Validation samples per step</div>"
    if not run.samples:
        return heading + "<div id='samples'><div class='empty'>no samples</div></div>"
    columns = sorted({(s.prompt_index, s.image_index) for step in run.samples for s in step.samples})
    prompts = run.prompts
    template = f"{layout.samples_label_width}px repeat({len(columns)}, {layout.cell}px)"
    cells = [f"<div class='colhead' style='height:{layout.samples_header_height}px'></div>"]
    for p, i in columns:
        prompt = prompts[p] if p < len(prompts) else f"prompt {p}"
        cells.append(f"<div class='colhead' title='{escape(prompt)}'>p{p} i{i}: {escape(prompt)}</div>")
    for step in run.samples:
        by_column = {(s.prompt_index, s.image_index): s for s in step.samples}
        label = f"step {step.step}" if step.step else "step 0 (base)"
        cells.append(f"<div class='steplabel'>{label}</div>")
        for column in columns:
            sample = by_column.get(column)
            if sample is None:
                cells.append("<div class='empty'>-</div>")
            else:
                alt = f"step {step.step} p{column[0]} i{column[1]}"
                cells.append(
                    f"<img src='{_png_data_uri(sample.path)}' alt='{escape(alt)}' "
                    f"width='{layout.cell}' height='{layout.cell}'>"
                )
    rows = f"{layout.samples_header_height}px"
    return (
        heading + f"<div id='samples' style='grid-template-columns: {template}; grid-template-rows: {rows}'>"
        f"{''.join(cells)}</div>"
    )


def _checkpoints(run: RunData) -> str:
    if not run.checkpoints:
        return "<section><h2>Checkpoints</h2><p class='empty'>none</p></section>"
    rows = "".join(
        f"<tr><td>{c.step}</td><td>{'complete' if c.complete else 'partial'}</td><td>{_fmt_bytes(c.size_bytes)}</td>"
        f"<td>{escape(c.created or '-')}</td><td>{escape(c.path.name)}</td></tr>"
        for c in run.checkpoints
    )
    return (
        "<section><h2>Checkpoints</h2><table id='checkpoints'><tr><th>step</th><th>state</th><th>size</th>"
        f"<th>time</th><th>folder</th></tr>{rows}</table></section>"
    )


def timings(run: RunData) -> dict[str, str]:
    """Wall-clock figures from result.json and the metrics' time stamps, and the job's GPU time when known."""
    out: dict[str, str] = {}
    duration = run.result.get("durationSeconds")
    if isinstance(duration, int | float):
        out["total duration"] = _fmt_duration(float(duration))
    timed = [(m.step, m.time) for m in run.metrics if m.time is not None]
    if len(timed) >= 2 and timed[-1][0] > timed[0][0]:
        (first_step, first_time), (last_step, last_time) = timed[0], timed[-1]
        span = last_time - first_time
        out["training time (metrics)"] = _fmt_duration(span)
        if span > 0:
            out["steps per second"] = f"{(last_step - first_step) / span:.3g}"
            out["seconds per step"] = f"{span / (last_step - first_step):.3g}"
    if run.gpu_time:
        out["GPU time (all pods and attempts)"] = run.gpu_time
    last_ckpt = run.result.get("lastCheckpoint")
    if isinstance(last_ckpt, dict) and "step" in last_ckpt:
        out["last checkpoint"] = f"step {last_ckpt['step']} at {last_ckpt.get('time', '-')}"
    return out


def _evaluation_grid(run: RunData) -> str:
    """The evaluation samples: a row per prompt, the trained model's images, then the base model's."""
    if run.evaluation_grid is None:
        return ""
    return (
        "<section><h2>Evaluation samples</h2><p>Each row is one prompt: the trained model's samples, then the base"
        " model's with the same seeds.</p>"
        f"<img id='evaluation-grid' alt='evaluation samples' src='{_png_data_uri(run.evaluation_grid)}'></section>"
    )


def _table_section(title: str, element_id: str, rows: dict[str, str]) -> str:
    if not rows:
        return f"<section><h2>{escape(title)}</h2><p class='empty'>none</p></section>"
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows.items())
    return f"<section><h2>{escape(title)}</h2><table id='{element_id}'>{body}</table></section>"


def render_report(run: RunData, *, title: str | None = None, layout: Layout = LAYOUT) -> str:
    """The whole report as one HTML string."""
    name = title or str(run.config.get("name") or run.root.name)
    evaluation = {k: f"{v:.4g}" for k, v in sorted(run.evaluation.items())}
    if run.quality_gate:
        evaluation["quality gate"] = run.quality_gate
    config = json.dumps(run.config, indent=2, sort_keys=True) if run.config else "(no config.json)"
    result = {k: str(v) for k, v in run.result.items() if not isinstance(v, dict | list)}
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>DreamBooth report: {escape(name)}</title><style>{_css(layout)}</style></head><body>"
        + _header(run, f"DreamBooth report: {name}")
        + _charts(run, layout)
        + _samples(run, layout)
        + _table_section("Timings", "timings", timings(run))
        + _table_section("Evaluation", "evaluation", evaluation)
        + _evaluation_grid(run)
        + _checkpoints(run)
        + _table_section("Result", "result", result)
        + f"<section><h2>Configuration</h2><pre id='config'>{escape(config)}</pre></section>"
        + "</body></html>\n"
    )


def write_report(run: RunData, path: Path, *, title: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(run, title=title), encoding="utf-8")
    return path

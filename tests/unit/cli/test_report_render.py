"""The HTML report: reading a run folder, the SVG charts, and a self-contained page."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from dreambooth_cli.report import load_run, render_report
from dreambooth_cli.report.data import parse_metrics
from dreambooth_cli.report.render import LAYOUT, timings
from dreambooth_cli.report.svg import Series, format_tick, line_chart, nice_ticks


def make_run(root: Path, *, steps: int = 20, sample_steps: tuple[int, ...] = (10, 20), prompts: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4 * min(1.0, s / 5), "time": 1_700_000_000 + s * 0.5})
        for s in range(1, steps + 1)
    ]
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\nnot json\n")
    config = {
        "name": "toy",
        "training": {
            "method": "full",
            "maxSteps": steps,
            "validation": {"prompts": [f"prompt {i}" for i in range(prompts)]},
        },
    }
    (root / "config.json").write_text(json.dumps(config))
    (root / "result.json").write_text(
        json.dumps(
            {"status": "succeeded", "steps": steps, "finalLoss": 0.05, "durationSeconds": 75.0, "modelUri": "file:///m"}
        )
    )
    (root / "evaluation.json").write_text(json.dumps({"clipScore": 0.31, "dinoSimilarity": 0.62}))
    for s in sample_steps:
        folder = root / "samples" / f"step-{s:08d}"
        folder.mkdir(parents=True)
        for p in range(prompts):
            Image.new("RGB", (16, 16), (40 * p + s, 100, 200)).save(folder / f"p{p}-i0.png")
    complete = root / "checkpoints" / "step-00000010"
    complete.mkdir(parents=True)
    (complete / "weights.safetensors").write_bytes(b"x" * 2048)
    (complete / "manifest.json").write_text(json.dumps({"step": 10, "files": {"weights.safetensors": {"size": 2048}}}))
    partial = root / "checkpoints" / "step-00000020"
    partial.mkdir()
    (partial / "weights.safetensors").write_bytes(b"y" * 10)
    return root


def test_load_run_reads_every_part(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "out"))
    assert [m.step for m in run.metrics] == list(range(1, 21))
    assert [s.step for s in run.samples] == [10, 20]
    assert [(c.step, c.complete, c.size_bytes) for c in run.checkpoints] == [(10, True, 2048), (20, False, 10)]
    assert run.evaluation == {"clipScore": 0.31, "dinoSimilarity": 0.62}
    assert run.prompts == ["prompt 0", "prompt 1"]


def test_metrics_last_line_per_step_wins_after_a_resume() -> None:
    text = "\n".join(
        json.dumps(row)
        for row in [
            {"step": 1, "loss": 0.9, "lr": 1.0, "time": "2026-11-27T00:00:00Z"},
            {"step": 2, "loss": 0.8, "lr": 1.0, "time": "2026-11-27T00:00:01Z"},
            {"step": 2, "loss": 0.7, "lr": 1.0, "time": "2026-11-27T00:00:05Z"},
            {"loss": 0.1},
        ]
    )
    points = parse_metrics(text)
    assert [(p.step, p.loss) for p in points] == [(1, 0.9), (2, 0.7)]
    assert points[1].time is not None
    assert points[0].time is not None
    assert points[1].time - points[0].time == 5.0


def test_report_is_self_contained_with_plots_samples_and_tables(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "out"))
    html = render_report(run)
    # Nothing is fetched from elsewhere: every src is a data: URI, no stylesheet or script links.
    assert re.findall(r"src=['\"](?!data:)", html) == []
    assert "<link" not in html
    assert "<script" not in html
    assert 'id="loss-chart"' in html
    assert 'id="lr-chart"' in html
    assert html.count("<polyline") == 3  # loss, loss trend, learning rate
    images = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(images) == 4  # two steps x two prompts
    first = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert first.getpixel((0, 0)) == (10, 100, 200)
    assert "prompt 1" in html
    assert "clipScore" in html
    assert "0.62" in html
    assert "complete" in html
    assert "partial" in html
    assert "2.0 KiB" in html
    assert "1m15s" in html  # duration from result.json


def test_report_of_an_empty_folder_still_renders(tmp_path: Path) -> None:
    html = render_report(load_run(tmp_path))
    assert "no data" in html
    assert "no samples" in html


def test_timings_from_metrics_timestamps(tmp_path: Path) -> None:
    out = timings(load_run(make_run(tmp_path / "out", steps=11)))
    assert out["steps per second"] == "2"  # one step every 0.5 s
    assert out["total duration"] == "1m15s"


def test_loss_chart_points_go_down_as_loss_falls() -> None:
    svg = line_chart(
        [Series("loss", [(0, 1.0), (5, 0.5), (10, 0.1)], "#f00")],
        width=400,
        height=200,
        title="t",
        x_label="x",
        y_label="y",
    )
    points = re.search(r"points=\"([^\"]+)\"", svg)
    assert points is not None
    coords = [tuple(map(float, p.split(","))) for p in points.group(1).split()]
    xs = [x for x, _ in coords]
    ys = [y for _, y in coords]
    assert xs == sorted(xs)
    assert ys == sorted(ys)  # SVG y grows downwards: falling loss -> rising y
    assert all(0 <= x <= 400 for x in xs)
    assert all(0 <= y <= 200 for y in ys)


@given(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
)
@example(lo=-5e-324, span=6.0)  # lo / step underflows to -0.0
def test_nice_ticks_cover_the_range(lo: float, span: float) -> None:
    hi = lo + span
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo + abs(lo) * 1e-9
    assert ticks[-1] >= hi - abs(hi) * 1e-9
    assert ticks == sorted(ticks)
    assert 2 <= len(ticks) <= 13


@pytest.mark.parametrize(("row", "column"), [(0, 0), (1, 1)])
def test_layout_sample_boxes_are_below_the_charts(row: int, column: int) -> None:
    left, top, right, bottom = LAYOUT.sample_box(row, column)
    assert top >= LAYOUT.loss_chart_box[3]
    assert right - left == LAYOUT.cell
    assert bottom - top == LAYOUT.cell


@pytest.mark.parametrize(("lo", "hi"), [(0.0009, 0.0011), (1e-5, 1e-4), (0.0, 1.0), (2e4, 3e5)])
def test_tick_labels_are_distinct(lo: float, hi: float) -> None:
    labels = [format_tick(t) for t in nice_ticks(lo, hi)]
    assert len(set(labels)) == len(labels), labels


@pytest.mark.parametrize(("value", "label"), [(1000.0, "1000"), (250.0, "250"), (0.003, "0.003"), (2.5e6, "2.5e+06")])
def test_step_ticks_are_whole_numbers_and_small_values_stay_short(value: float, label: str) -> None:
    assert format_tick(value) == label


def test_report_shows_the_evaluation_grid_and_quality_gate(tmp_path: Path) -> None:
    """The layout the trainer's evaluation writes (evaluation/result.json, evaluation/grid.png) reaches the report."""
    from dreambooth_api.evaluation import EvaluationResult, MetricScores, QualityGate

    root = make_run(tmp_path / "run")
    (root / "evaluation").mkdir()
    Image.new("RGB", (64, 32), (200, 10, 10)).save(root / "evaluation" / "grid.png")
    result = EvaluationResult(
        trained=MetricScores(dino=0.5),
        quality_gate=QualityGate.FAILED,
        quality_gate_reason="conceptPreservation 1.2 < 2.0",
    )
    (root / "evaluation" / "result.json").write_text(json.dumps(result.to_wire()))
    run = load_run(root)
    assert run.quality_gate == "failed: conceptPreservation 1.2 < 2.0"
    html = render_report(run)
    assert "id='evaluation-grid'" in html
    assert "data:image/png;base64," in html.split("id='evaluation-grid'")[1][:200]
    assert "failed: conceptPreservation 1.2 &lt; 2.0" in html
    # A run without evaluation shows no grid and no gate.
    plain = load_run(make_run(tmp_path / "plain"))
    assert plain.quality_gate is None
    assert "evaluation-grid" not in render_report(plain)

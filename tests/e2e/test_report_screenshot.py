"""Headless Debian chromium renders the HTML report; the plots and the sample grid are where the layout says.

The screenshot is kept under the test's tmp dir; its path is printed (run pytest with -s to see it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from PIL import Image

from dreambooth_cli.report import load_run, write_report
from dreambooth_cli.report.render import LAYOUT, LOSS_TREND_COLOR, LR_COLOR
from tests.infra.paths import ROOT

# One solid colour per (step row, prompt column), so each grid cell is identifiable in the screenshot.
CELL_COLOURS = {
    (0, 0): (230, 40, 40),
    (0, 1): (40, 200, 40),
    (1, 0): (40, 40, 230),
    (1, 1): (240, 200, 0),
}


def chromium() -> str:
    found = shutil.which("chromium") or str(ROOT / ".tools/bin/chromium")
    assert Path(found).exists(), "chromium is missing: make binaries"
    return found


def make_run(root: Path) -> Path:
    root.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 1.0 / (1 + 0.1 * s), "lr": 1e-4 * min(1.0, s / 20)}) for s in range(1, 101)]
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (root / "config.json").write_text(
        json.dumps({"name": "shot", "training": {"maxSteps": 100, "validation": {"prompts": ["a", "b"]}}})
    )
    for (row, column), colour in CELL_COLOURS.items():
        folder = root / "samples" / f"step-{(row + 1) * 50:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(folder / f"p{column}-i0.png")
    return root


def hex_rgb(value: str) -> tuple[int, int, int]:
    return (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))


def count_near(img: Image.Image, box: tuple[int, int, int, int], colour: tuple[int, int, int], tol: int = 40) -> int:
    region = img.crop(box).convert("RGB")
    return sum(
        n
        for n, px in region.getcolors(region.width * region.height) or []
        if all(abs(a - b) <= tol for a, b in zip(px, colour, strict=True))
    )


def test_report_screenshot_shows_plots_and_sample_grid(tmp_path: Path) -> None:
    binary = chromium()
    run_dir = make_run(tmp_path / "run")
    report = write_report(load_run(run_dir), tmp_path / "report.html")
    shot = tmp_path / "report.png"
    width, height = LAYOUT.page_width, LAYOUT.sample_box(1, 1)[3] + 60
    result = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            f"--screenshot={shot}",
            f"--window-size={width},{height}",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert shot.is_file(), f"no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    print(f"report screenshot: {shot}")
    img = Image.open(shot).convert("RGB")
    assert img.size == (width, height)

    # The loss plot: the dark red trend line is drawn inside the loss chart box and not in the LR box.
    trend = hex_rgb(LOSS_TREND_COLOR)
    assert count_near(img, LAYOUT.loss_chart_box, trend) > 200
    assert count_near(img, LAYOUT.lr_chart_box, trend) == 0
    # The learning-rate plot: its blue line is inside the LR chart box.
    assert count_near(img, LAYOUT.lr_chart_box, hex_rgb(LR_COLOR)) > 200

    # The sample grid: every cell shows its own sample, filling the cell.
    for (row, column), colour in CELL_COLOURS.items():
        left, top, right, bottom = LAYOUT.sample_box(row, column)
        cell = (left + 4, top + 4, right - 4, bottom - 4)
        inside = count_near(img, cell, colour, tol=12)
        assert inside == (cell[2] - cell[0]) * (cell[3] - cell[1]), f"cell {(row, column)} is not where expected"

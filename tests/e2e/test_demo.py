"""The `make demo` path, unchanged: draw the subject, run examples/demo-job.yaml locally through the real trainer
subprocess, find the model, the validation samples and the report where the command says, and check that the
samples move from noise toward the subject.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth_cli import subject as toy
from dreambooth_cli.report import load_run
from tests.infra.paths import ROOT

DREAMBOOTH = str(Path(sys.executable).parent / "dreambooth")
PALETTE = np.array([toy.BACKGROUND, toy.BODY, toy.HAT, toy.BASE, toy.EYE, toy.PUPIL], dtype=np.float32) / 255
SAMPLE_STEPS = [0, 250, 500, 750, 1000]


def _palette_stats(image: Image.Image, size: int = 32) -> tuple[float, np.ndarray]:
    """Mean squared distance of each pixel to the toy's nearest palette colour, and the share of pixels nearest to
    each palette colour (background, body, hat, base, eye, pupil)."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    dist = ((pixels[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    shares = np.bincount(dist.argmin(-1).ravel(), minlength=len(PALETTE)) / dist[..., 0].size
    return float(dist.min(-1).mean()), shares


def test_demo_runs_locally_and_writes_model_samples_and_report(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    subject = workdir / "subject"
    drawn = subprocess.run(
        [DREAMBOOTH, "demo-subject", str(subject)], capture_output=True, text=True, timeout=120, check=False
    )
    assert drawn.returncode == 0, drawn.stderr
    assert len(list(subject.glob("*.png"))) == 6

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "WORLD_SIZE", "MASTER_"))}
    result = subprocess.run(
        [
            DREAMBOOTH,
            "run",
            str(ROOT / "examples" / "demo-job.yaml"),
            "--local",
            "--workdir",
            str(workdir),
            "--images",
            str(subject),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert result.returncode == 0, f"{result.stderr[-3000:]}"
    assert "images: 6 copied, 0 already there" in result.stderr
    assert re.search(r"step 1000/1000 loss \d", result.stderr), result.stderr[-2000:]

    paths = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    model, samples, report = (Path(paths[k].strip()) for k in ("model", "samples", "report"))
    output = workdir / "s3" / "demo" / "models" / "demo-toy"
    assert model == output / "model"
    assert (model / "model_index.json").is_file()
    assert (model / "unet").is_dir()

    assert sorted(p.name for p in samples.iterdir()) == [f"step-{step:08d}" for step in SAMPLE_STEPS]
    images = {
        (step, p): Image.open(samples / f"step-{step:08d}" / f"p{p}-i0.png") for step in SAMPLE_STEPS for p in (0, 1)
    }
    assert {im.size for im in images.values()} == {(32, 32)}

    # The samples move toward the subject: from step 0 (the untrained UNet: noise) to the last step, the pixels come
    # within reach of the toy's palette, and the palette's shares come close to the photos' (mostly background,
    # about a fifth body).
    photos = [_palette_stats(Image.open(f)) for f in sorted(subject.glob("*.png"))]
    photo_shares = np.mean([shares for _, shares in photos], axis=0)
    for p in (0, 1):
        first_dist, first_shares = _palette_stats(images[(0, p)])
        last_dist, last_shares = _palette_stats(images[(1000, p)])
        assert last_dist < 0.4 * first_dist, (p, first_dist, last_dist)
        first_gap, last_gap = (float(np.abs(s - photo_shares).sum()) for s in (first_shares, last_shares))
        assert last_gap < 0.3 * first_gap, (p, first_gap, last_gap, last_shares)
        assert last_shares[0] > 0.5, last_shares  # the pale blue background
        assert last_shares[1] > 0.1, last_shares  # the magenta body

    assert report == workdir / "report.html"
    html = report.read_text()
    assert html.count("data:image/png;base64,") == 2 * len(SAMPLE_STEPS)
    assert "step 0 (base)" in html
    assert html.count("<polyline") >= 2
    run = load_run(output)
    assert [m.step for m in run.metrics][-1] == 1000
    assert run.result["status"] == "succeeded"

"""The `make demo` path with fewer steps: draw the subject, run examples/demo-job.yaml locally through the real
trainer subprocess, and find the model, the validation samples and the report where the command says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image

from dreambooth_operator.report import load_run

ROOT = Path(__file__).resolve().parents[2]
DREAMBOOTH = str(Path(sys.executable).parent / "dreambooth")


def test_demo_runs_locally_and_writes_model_samples_and_report(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    subject = workdir / "subject"
    drawn = subprocess.run(
        [DREAMBOOTH, "demo-subject", str(subject)], capture_output=True, text=True, timeout=120, check=False
    )
    assert drawn.returncode == 0, drawn.stderr
    assert len(list(subject.glob("*.png"))) == 6

    job = yaml.safe_load((ROOT / "examples" / "demo-job.yaml").read_text())
    training = job["spec"]["training"]
    training["maxSteps"] = 6
    training["validation"]["intervalSteps"] = 3
    training["validation"]["steps"] = 2
    training["checkpoint"]["intervalSteps"] = 3
    job_file = tmp_path / "demo-job.yaml"
    job_file.write_text(yaml.safe_dump(job))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "WORLD_SIZE", "MASTER_"))}
    result = subprocess.run(
        [DREAMBOOTH, "run", str(job_file), "--local", "--workdir", str(workdir), "--images", str(subject)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert result.returncode == 0, f"{result.stderr[-3000:]}"
    assert "images: 6 copied, 0 already there" in result.stderr
    assert re.search(r"step 6/6 loss \d", result.stderr), result.stderr[-2000:]

    paths = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    model, samples, report = (Path(paths[k].strip()) for k in ("model", "samples", "report"))
    output = workdir / "s3" / "demo" / "models" / "demo-toy"
    assert model == output / "model"
    assert (model / "model_index.json").is_file()
    assert (model / "unet").is_dir()

    steps = sorted(p.name for p in samples.iterdir())
    assert steps == ["step-00000003", "step-00000006"]
    for step in steps:
        for prompt in range(2):
            image = Image.open(samples / step / f"p{prompt}-i0.png")
            assert image.size == (32, 32)

    assert report == workdir / "report.html"
    html = report.read_text()
    assert html.count("data:image/png;base64,") == 4
    assert html.count("<polyline") >= 2
    run = load_run(output)
    assert [m.step for m in run.metrics][-1] == 6
    assert run.result["status"] == "succeeded"

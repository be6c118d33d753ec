"""What the shared class-image cache saves per subject: two subjects with the same prior settings, one after the other.

Both run the real trainer as `dreambooth run --local` (the same subprocess a pod runs; s3:// becomes file:// under one
work folder, so both jobs see the same default cache, `<output>/../class-cache`). Subject 1 finds the cache empty
and generates the class images; subject 2 has the same key (base model, class prompt, resolution, sampler, steps,
seed, count) and generates none. Measured per subject: the wall time of the whole run (process start to exit:
imports, model build, class images, training, export) and the class images the cache holds after it.

The tiny model on CPU: the figures show the share of a subject's run that the cache removes at this size, not GPU
times (on a GPU, class generation at SD 1.5 size is far dearer than the tiny model's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.results_file import write_result

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("dreambooth")
CLASS_IMAGES = 48
SAMPLING_STEPS = 20
TRAIN_STEPS = 100


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"tiny": True},
            "instanceImages": {"uri": f"s3://bench/subjects/{name}/", "prompt": "a photo of sks toy"},
            "priorPreservation": {
                "enabled": True,
                "classPrompt": "a photo of a toy",
                "numImages": CLASS_IMAGES,
                "steps": SAMPLING_STEPS,
                "guidanceScale": 1.0,
            },
            "training": {"maxSteps": TRAIN_STEPS, "resolution": 32, "batchSize": 2},
            "output": {"uri": f"s3://bench/models/{name}/"},
        },
    }


def _cached_images(work: Path) -> int:
    cache = work / "s3" / "bench" / "models" / "class-cache"
    return sum(1 for p in cache.rglob("*.png")) if cache.exists() else 0


def _one(work: Path, subject: Path, name: str) -> dict[str, Any]:
    manifest = work.parent / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(job(name)))
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    start = time.monotonic()
    done = subprocess.run(
        [str(CLI), "run", str(manifest), "--local", "--workdir", str(work), "--images", str(subject)],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip
    seconds = round(time.monotonic() - start, 2)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {"seconds": seconds, "classImagesCached": _cached_images(work)}


def run(results_dir: Path) -> dict[str, Any]:
    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-prior-cache-") as tmp:
        work, subject = Path(tmp) / "work", Path(tmp) / "subject"
        subprocess.run([str(CLI), "demo-subject", str(subject)], check=True, capture_output=True, timeout=300)
        first = _one(work, subject, "subject-1")
        second = _one(work, subject, "subject-2")
    result: dict[str, Any] = {
        "setup": f"tiny model on CPU, {CLASS_IMAGES} class images x {SAMPLING_STEPS} sampling steps, "
        f"{TRAIN_STEPS} training steps at 32 px, each subject one `dreambooth run --local`",
        "firstSubject": {**first, "classImagesGenerated": first["classImagesCached"]},
        "secondSubject": {**second, "classImagesGenerated": second["classImagesCached"] - first["classImagesCached"]},
        "savedSecondsPerSubject": round(first["seconds"] - second["seconds"], 2),
        "savedFraction": round(1 - second["seconds"] / first["seconds"], 3),
    }
    return write_result(results_dir, "prior_cache.json", result)


if __name__ == "__main__":
    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))

"""Serving: images/s and latency of `dreambooth-serve` with and without dynamic batching, and subject switching.

For each mode, a server process (`python -m dreambooth_trainer.serving.server`, the console script's code) serves the
model: `batched` (maxBatchSize 16, the default maxBatchDelayMs 10) and `unbatched` (maxBatchSize 1: the server's own
mode with batching off), in the same run on the same machine. For each concurrency c in (1, 4, 16), c client threads
send requests back to back over keep-alive connections (one image each, every request its own seed, the same size
and steps); reported: images/s (images over the wall time of the level) and the latency p50/p95 of a request.

Subjects: random LoRA adapters (written as a LoRA job's export writes them) in a subjects file, served with an LRU
of 2. `coldLoadSeconds` is the server's own `dreambooth_serve_adapter_load_seconds` (download from file:// storage and
load into the pipeline) for first uses; `warmSwitchSeconds` its `dreambooth_serve_adapter_switch_seconds` while
alternating between two loaded subjects; the request latencies of both are reported too.

- `run(results_dir)` (`make bench`): the tiny model on the CPU (32 px, 4 steps): a regression check, not a speed
  claim. Writes `serve.json`.
- `run_gpu(results_dir)` (bench/device_check.sh: `python -m bench.bench_serve --gpu`): an SD 1.5-sized model (random
  weights from configs, the tiny model's tokenizer), 512 px, 25 DPM-Solver steps, fp16, rank-16 LoRA subjects;
  also the largest pixel difference between a seed's image alone and inside a batch of 16 (the GPU tolerance).
  Writes `serve_gpu.json` with the issue's targets and whether each is met. `--gpu --dry-run` runs that code path
  with the tiny model's sizes on the CPU and writes nothing (tests/unit/bench/test_bench_serve.py).

The parts: `serve_models.py` (the models and their LoRA subjects), `serve_process.py` (the server launch),
`serve_load.py` (the load generator), `serve_figures.py` (subject switching, batch tolerance, targets).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.results_file import write_result
from bench.serve_figures import TARGETS, against_targets, batch_tolerance, mean_batch_size, subjects_phase
from bench.serve_load import PROMPTS, Client, Size, level, request_body
from bench.serve_models import lora_subjects, sd15_model, tiny_model
from bench.serve_process import server_process

__all__ = ["CONCURRENCY", "CPU", "DRY_RUN", "GPU", "TARGETS", "Size", "benchmark", "main", "run", "run_gpu"]

SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"
"""The tiny model's build, shared with the tests."""
CONCURRENCY = (1, 4, 16)

CPU = Size("tiny-cpu", 32, 4, "dpm_solver", 4, {1: 8, 4: 16, 16: 32}, 4)
GPU = Size("sd15-gpu", 512, 25, "dpm_solver", 16, {1: 6, 4: 16, 16: 48}, 4)
DRY_RUN = Size("sd15-dry-run", 32, 2, "dpm_solver", 4, {1: 2, 4: 4, 16: 16}, 3)
"""`--gpu --dry-run`: the GPU variant's code path with the tiny model's sizes, on the CPU."""


def benchmark(size: Size, model: Path, scratch: Path) -> dict[str, Any]:
    subjects = lora_subjects(model, scratch / "subjects", size.subjects, size.lora_rank)
    subjects_file = scratch / "subjects.json"
    subjects_file.write_text(json.dumps(subjects))
    server = {
        "maxResolution": max(size.resolution, 64),
        "maxSteps": size.steps,
        "defaultSteps": size.steps,
        "defaultScheduler": size.scheduler,
        "maxQueuedRequests": 256,
        "maxLoadedAdapters": 2,
        "requestTimeoutSeconds": 600,
    }
    modes = {
        "batched": {**server, "maxBatchSize": 16},  # maxBatchDelayMs: the default (10)
        "unbatched": {**server, "maxBatchSize": 1, "maxBatchDelayMs": 0},
    }
    out: dict[str, Any] = {"size": size.name, "resolution": size.resolution, "steps": size.steps, "modes": {}}
    for mode, limits in modes.items():
        config = {"modelUri": model.as_uri(), "subjectsFile": str(subjects_file), "server": limits}
        with server_process(config, scratch / f"work-{mode}", scratch / f"server-{mode}.log") as url:
            Client(url).generate(request_body(size, PROMPTS[0], 0))  # warm (the warm-up ran at the native size)
            levels = [level(url, size, c, size.requests[c], 1000 * c) for c in CONCURRENCY]
            result: dict[str, Any] = {"levels": levels}
            if mode == "batched":
                result["subjectSwitching"] = subjects_phase(url, size, list(subjects))
                result["batchTolerance"] = batch_tolerance(url, size)
                result["meanBatchSize"] = mean_batch_size(url)
            out["modes"][mode] = result
        print(f"[bench_serve] {size.name} {mode}: {json.dumps(result)}", flush=True)
    batched = {lv["concurrency"]: lv for lv in out["modes"]["batched"]["levels"]}
    plain = {lv["concurrency"]: lv for lv in out["modes"]["unbatched"]["levels"]}
    out["speedup"] = {
        str(c): round(batched[c]["imagesPerSecond"] / plain[c]["imagesPerSecond"], 3) for c in CONCURRENCY
    }
    return out


def run(results_dir: Path) -> dict[str, Any]:
    """The tiny model on the CPU (`make bench`)."""
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        result = benchmark(CPU, tiny_model(SHARED_MODELS), Path(tmp))
    result["device"] = "cpu"
    return write_result(results_dir, "serve.json", result)


def run_gpu(results_dir: Path, dry_run: bool = False) -> dict[str, Any]:
    """The SD 1.5-sized model on CUDA (bench/device_check.sh); {"skipped": ...} without CUDA. `dry_run`: every code
    path with the tiny model's sizes on the CPU, nothing written."""
    import torch

    if not dry_run and not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    with tempfile.TemporaryDirectory(prefix="bench-serve-gpu-") as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        model = sd15_model(scratch / "sd15", SHARED_MODELS, dry_run=dry_run)
        built = time.perf_counter() - started
        result = benchmark(DRY_RUN if dry_run else GPU, model, scratch)
    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result["modelBuildSeconds"] = round(built, 1)
    result["targets"] = against_targets(result)
    if dry_run:
        return result
    results_dir.mkdir(parents=True, exist_ok=True)
    return write_result(results_dir, "serve_gpu.json", result)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the SD 1.5-sized model on CUDA (writes serve_gpu.json)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: the tiny sizes on the CPU, writes nothing")
    args = parser.parse_args(argv)
    results = Path(__file__).parent / "results"
    result = run_gpu(results, dry_run=args.dry_run) if args.gpu else run(results)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

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
  Writes `serve_gpu.json` with the issue's targets and whether each is met.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.results_file import write_result

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"
"""The tiny model's build, shared with the tests."""
CONCURRENCY = (1, 4, 16)
PROMPTS = ("a photo of sks dog", "a red car in the city", "a portrait of a woman", "a green tree on the beach")
TARGETS = {  # issue 15, one H100/H200, SD 1.5-sized, 512 px, 25 steps, fp16
    "batchedOverUnbatchedAt16": 1.5,
    "imagesPerSecondAt16": 7.0,
    "latencyAt1Seconds": 0.45,
    "warmSwitchSeconds": 0.05,
    "coldLoadSeconds": 1.0,
}


@dataclass(frozen=True)
class Size:
    name: str
    resolution: int
    steps: int
    scheduler: str
    lora_rank: int
    requests: dict[int, int]
    """Requests per concurrency level."""
    subjects: int


CPU = Size("tiny-cpu", 32, 4, "dpm_solver", 4, {1: 8, 4: 16, 16: 32}, 4)
GPU = Size("sd15-gpu", 512, 25, "dpm_solver", 16, {1: 6, 4: 16, 16: 48}, 4)
DRY_RUN = Size("sd15-dry-run", 32, 2, "dpm_solver", 4, {1: 2, 4: 4, 16: 16}, 3)
"""`--gpu --dry-run`: the GPU variant's code path with the tiny model's sizes, on the CPU."""


# ----- the model and its subjects ---------------------------------------------------------------------------------
def tiny_model(cache: Path) -> Path:
    from dreambooth_trainer.tiny import build_tiny_pipeline

    return build_tiny_pipeline(cache / "tiny")


def sd15_model(folder: Path, cache: Path, dry_run: bool = False) -> Path:
    """An SD 1.5-sized diffusers folder with random weights (fp16), the tiny model's tokenizer, DPM-Solver config
    (`dry_run`: the tiny model's sizes, to run the code path on a CPU in seconds)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from bench.bench_gpu_train import SD15_SCHEDULER, SD15_TEXT, SD15_UNET, SD15_VAE
    from dreambooth_trainer import tiny

    unet_config, vae_config, text_config = SD15_UNET, SD15_VAE, SD15_TEXT
    if dry_run:
        unet_config, vae_config = tiny.UNET_CONFIG, tiny.VAE_CONFIG
        text_config = {**tiny.TEXT_CONFIG, "vocab_size": 1000}
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init is far quicker on the GPU
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    for module in (unet, vae, text_encoder):  # keep activations finite in fp16: random weights, small scale
        with torch.no_grad():
            for p in module.parameters():
                if p.dim() > 1:
                    p.mul_(0.5)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tiny_model(cache) / "tokenizer"),
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=torch.float32 if dry_run else torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, unet, vae, text_encoder
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def lora_subjects(model: Path, out: Path, count: int, rank: int) -> dict[str, str]:
    """`count` random LoRA adapters of the model's UNet (rank `rank` on to_q/to_k/to_v/to_out.0), saved with
    `save_lora_weights` as the export does; returns the subjects file's mapping."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    subjects = {}
    unet = None
    for i in range(count):
        folder = out / f"subject-{i}"
        subjects[f"subject-{i}"] = folder.as_uri()
        if (folder / "pytorch_lora_weights.safetensors").is_file():
            continue
        if unet is None:
            unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32)
        name = f"s{i}"
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        unet.add_adapter(config, adapter_name=name)
        unet.set_adapter(name)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, param in unet.named_parameters():
                if f".{name}." in key and "lora_B" in key:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        layers = {k.replace(f".{name}", ""): v for k, v in _adapter_state(unet, name).items()}
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers={k: v.half() for k, v in layers.items()}, safe_serialization=True
        )
        unet.delete_adapters(name)
    return subjects


def _adapter_state(unet: Any, name: str) -> dict[str, Any]:
    """One adapter's layers in diffusers' key names (as `export.writers.lora_state_dicts` converts them)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return dict(convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=name)))


# ----- the server process -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(config: dict[str, Any], workdir: Path, log: Path, timeout: float = 600) -> Iterator[str]:
    """A `dreambooth-serve` process with `config`; yields its base URL once /readyz says ready."""
    port = _free_port()
    env = {
        **os.environ,
        "DREAMBOOTH_SERVE_CONFIG": json.dumps(config),
        "DREAMBOOTH_WORKDIR": str(workdir),
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "trainer" / "src"), str(ROOT / "api" / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    env.pop("DREAMBOOTH_SERVE_TOKEN", None)
    argv = [sys.executable, "-m", "dreambooth_trainer.serving.server", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited {proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready in {timeout:g}s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:  # noqa: S310 - a local URL
            return bool(response.status == 200)
    except OSError:
        return False


# ----- the load -----------------------------------------------------------------------------------------------------
class Client:
    """One keep-alive connection."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=600)

    def generate(self, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        self.conn.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data}")
        return time.perf_counter() - started, data

    def close(self) -> None:
        self.conn.close()


def level(url: str, size: Size, concurrency: int, requests: int, seed0: int) -> dict[str, Any]:
    """`requests` one-image requests from `concurrency` threads, back to back."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        client = Client(url)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = _body(size, PROMPTS[i % len(PROMPTS)], seed0 + i)
                seconds, _ = client.generate(body)
                with lock:
                    latencies.append(seconds)
        finally:
            client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": requests,
        "imagesPerSecond": round(requests / wall, 3),
        "latencyP50Seconds": round(_percentile(latencies, 50), 4),
        "latencyP95Seconds": round(_percentile(latencies, 95), 4),
        "wallSeconds": round(wall, 2),
    }


def _body(size: Size, prompt: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "size": f"{size.resolution}x{size.resolution}",
        "seed": seed,
        "num_inference_steps": size.steps,
        **extra,
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:  # noqa: S310 - a local URL
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def _mean_delta(after: dict[str, float], before: dict[str, float], name: str) -> float | None:
    count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
    total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
    return round(total / count, 4) if count else None


def subjects_phase(url: str, size: Size, names: list[str]) -> dict[str, Any]:
    """Cold loads (first use of each subject) and warm switches (two loaded subjects, alternating)."""
    client = Client(url)
    try:
        base = [client.generate(_body(size, PROMPTS[0], 1))[0] for _ in range(2)][-1]
        before = scrape(url)
        cold = [client.generate(_body(size, PROMPTS[0], 1, model=name))[0] for name in names]
        mid = scrape(url)
        # The last two subjects are loaded (LRU of 2): alternate between them.
        warm = [client.generate(_body(size, PROMPTS[0], 1, model=names[-2 + i % 2]))[0] for i in range(8)]
        after = scrape(url)
    finally:
        client.close()
    return {
        "subjects": len(names),
        "coldLoadSeconds": _mean_delta(mid, before, "dreambooth_serve_adapter_load_seconds"),
        "coldRequestSeconds": round(statistics.median(cold), 4),
        "warmSwitchSeconds": _mean_delta(after, mid, "dreambooth_serve_adapter_switch_seconds"),
        "warmRequestSeconds": round(statistics.median(warm), 4),
        "baseRequestSeconds": round(base, 4),
        "loads": after.get("dreambooth_serve_adapter_loads_total", 0)
        - before.get("dreambooth_serve_adapter_loads_total", 0),
        "evictions": after.get("dreambooth_serve_adapter_evictions_total", 0)
        - before.get("dreambooth_serve_adapter_evictions_total", 0),
    }


def batch_tolerance(url: str, size: Size) -> dict[str, Any]:
    """The largest 8-bit pixel difference between seeds' images alone and inside one batch of 16."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    def pixels(data: dict[str, Any]) -> Any:
        raw = base64.b64decode(data["data"][0]["b64_json"])
        return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)

    client = Client(url)
    alone = [pixels(client.generate(_body(size, PROMPTS[0], 500 + i))[1]) for i in range(4)]
    client.close()
    batched: dict[int, Any] = {}

    def one(i: int) -> None:
        c = Client(url)
        batched[i] = pixels(c.generate(_body(size, PROMPTS[0], 500 + i))[1])
        c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"maxPixelDifference": int(max(np.abs(alone[i] - batched[i]).max() for i in range(4)))}


# ----- the benchmark ------------------------------------------------------------------------------------------------
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
            Client(url).generate(_body(size, PROMPTS[0], 0))  # warm (the warm-up ran at the native size)
            levels = [level(url, size, c, size.requests[c], 1000 * c) for c in CONCURRENCY]
            result: dict[str, Any] = {"levels": levels}
            if mode == "batched":
                result["subjectSwitching"] = subjects_phase(url, size, list(subjects))
                result["batchTolerance"] = batch_tolerance(url, size)
                metrics = scrape(url)
                result["meanBatchSize"] = round(
                    metrics.get("dreambooth_serve_batch_size_sum", 0)
                    / max(1.0, metrics.get("dreambooth_serve_batch_size_count", 0)),
                    2,
                )
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
    result["targets"] = _against_targets(result)
    if dry_run:
        return result
    results_dir.mkdir(parents=True, exist_ok=True)
    return write_result(results_dir, "serve_gpu.json", result)


def _against_targets(result: dict[str, Any]) -> dict[str, Any]:
    batched = {lv["concurrency"]: lv for lv in result["modes"]["batched"]["levels"]}
    switching = result["modes"]["batched"]["subjectSwitching"]
    measured = {
        "batchedOverUnbatchedAt16": result["speedup"]["16"],
        "imagesPerSecondAt16": batched[16]["imagesPerSecond"],
        "latencyAt1Seconds": batched[1]["latencyP50Seconds"],
        "warmSwitchSeconds": switching["warmSwitchSeconds"],
        "coldLoadSeconds": switching["coldLoadSeconds"],
    }
    higher = {"batchedOverUnbatchedAt16", "imagesPerSecondAt16"}
    return {
        name: {
            "target": target,
            "measured": measured[name],
            "met": measured[name] is not None
            and (measured[name] >= target if name in higher else measured[name] <= target),
        }
        for name, target in TARGETS.items()
    }


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

"""Training speed and memory of our trainer on one GPU at Stable Diffusion 1.5 size.

The UNet, VAE and text encoder have SD 1.5's architecture (UNet ~860M parameters) with random weights built from
configs (no hub). Each case builds the trainer's own training (`builder.build_training`, as a job does) and times
`TrainLoop.train_step` around `DreamBoothModule.compute_loss`:
512x512, one instance image plus one prior-preservation class image per step (effective batch 2), bf16 mixed
precision through Lightning Fabric, cached VAE latents and prompt embeddings (the trainer's default), gradient
clipping at 1.0, AdamW (fused on CUDA), and the LR scheduler.

Cases: `lora-r8` (rank 8 on to_q/to_k/to_v/to_out.0), `full` and `full-gc` (full fine-tuning of the UNet, without and
with gradient checkpointing). For each: `warmup` untimed steps, then `steps` timed steps (synchronized wall time per
step; the median is reported), peak GPU memory (allocated and reserved), and the time to build the model from
configs and move it to the GPU. `gpuMinutesPerSubject` is the training loop only (median step time x steps): model
loading, class-image generation, checkpoints and export come on top.

`python -m bench.bench_gpu_train --dry-run` runs every code path on CPU with the tiny model in seconds.
On CPU without `--dry-run`, `run()` returns {"skipped": "no CUDA"} and writes nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESOLUTION = 512
WARMUP = 10
STEPS = 30
SUBJECT_STEPS = (400, 800)

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE: dict[str, Any] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
}
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
CASES: dict[str, dict[str, Any]] = {
    "lora-r8": {"method": "lora", "lora": {"rank": 8, "alpha": 8}},
    "full": {"method": "full"},
    "full-gc": {"method": "full", "gradientCheckpointing": True},
}

# SD 1.x's training schedule (epsilon prediction, scaled-linear betas); the tiny model uses a zero-SNR v-prediction
# variant, which costs the same per step but is not what SD 1.5 fine-tunes run.
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


class _Size:
    """What a run builds: SD 1.5 on the GPU, or the tiny model on CPU for a dry run."""

    def __init__(self, dry_run: bool) -> None:
        from dreambooth_trainer import tiny

        self.dry_run = dry_run
        if dry_run:
            self.unet, self.vae = tiny.UNET_CONFIG, tiny.VAE_CONFIG
            self.text = {**tiny.TEXT_CONFIG, "vocab_size": 1000}
            self.resolution, self.warmup, self.steps = tiny.TINY_RESOLUTION, 1, 2
        else:
            self.unet, self.vae, self.text = SD15_UNET, SD15_VAE, SD15_TEXT
            self.resolution, self.warmup, self.steps = RESOLUTION, WARMUP, STEPS
        self.scheduler = SD15_SCHEDULER


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_components(size: _Size, device: torch.device, seed: int = 0) -> tuple[Any, dict[str, float]]:
    """The trainer's `Components` with random weights from configs, frozen, fp32, on `device`; and build timings."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth_trainer.components import Components

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**size.unet)
    vae = AutoencoderKL(**size.vae)
    text_encoder = CLIPTextModel(CLIPTextConfig(**size.text))
    built = time.perf_counter() - t0
    t1 = time.perf_counter()
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.eval()
        model.to(device)
    _sync(device)
    moved = time.perf_counter() - t1
    comps = Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,  # the timed steps use cached prompt embeddings, as the trainer does by default
        noise_scheduler=DDPMScheduler(**size.scheduler),
        model_dir=Path(tempfile.gettempdir()),
    )
    return comps, {"buildSeconds": round(built, 3), "toDeviceSeconds": round(moved, 3)}


@torch.no_grad()
def cached_dataset(comps: Any, size: _Size, device: torch.device) -> list[dict[str, dict[str, torch.Tensor]]]:
    """One DreamBoothDataset-style item (instance and class rows) holding VAE latent parameters and prompt embeddings
    encoded by the (random) VAE and text encoder from a random image and random token ids, kept on CPU."""
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for kind in ("instance", "class"):
        pixels = torch.rand((1, 3, size.resolution, size.resolution), generator=gen) * 2 - 1
        ids = torch.randint(0, int(size.text["vocab_size"]), (1, 77), generator=gen)
        params = comps.vae.encode(pixels.to(device)).latent_dist.parameters
        embeds = comps.text_encoder(ids.to(device))[0]
        rows[kind] = {"latent_params": params[0].float().cpu(), "prompt_embeds": embeds[0].float().cpu()}
    return [rows]


def _config(case: dict[str, Any], size: _Size, out: Path, mixed: str) -> Any:
    from dreambooth_api.config import parse_job_config

    training = {
        "resolution": size.resolution,
        "maxSteps": 1000,
        "learningRate": 1e-5,
        "mixedPrecision": mixed,
        "checkpoint": {"intervalSteps": None, "intervalSeconds": None},
        **case,
    }
    return parse_job_config(
        {
            "name": "bench",
            "instanceImages": {"uri": (out / "subject").as_uri(), "prompt": "a photo of sks dog"},
            "priorPreservation": {"enabled": True, "classPrompt": "a photo of dog"},
            "training": training,
            "output": {"uri": (out / "out").as_uri()},
        }
    )


def measure_case(name: str, size: _Size, device: torch.device, scratch: Path) -> dict[str, Any]:
    from dreambooth_trainer.builder import build_training, configure_cuda_math, fabric_precision, make_fabric
    from dreambooth_trainer.preemption import Preemption
    from dreambooth_trainer.storage import ObjectStore

    mixed = "bf16" if device.type == "cuda" else "no"
    config = _config(CASES[name], size, scratch / name, mixed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    configure_cuda_math(config)  # as run_job does: TF32 for what still runs in fp32
    comps, timings = build_components(size, device)
    dataset = cached_dataset(comps, size, device)
    fabric = make_fabric(config, local=True)
    fabric.launch()
    precision = fabric_precision(config, device.type == "cuda")
    (scratch / name).mkdir(parents=True, exist_ok=True)
    training = build_training(
        config, comps, dataset, fabric=fabric, store=ObjectStore(), preemption=Preemption(), scratch=scratch / name
    )
    module, loop = training.module, training.loop
    trainable = sum(p.numel() for p in module.unet_parameters())
    optimizer = getattr(training.optimizer, "optimizer", training.optimizer)  # the torch one Fabric wraps
    times: list[float] = []
    losses: list[float] = []
    try:
        for step in range(size.warmup + size.steps):
            _sync(device)
            t0 = time.perf_counter()
            loss, _ = loop.train_step(step)  # ends with float(loss): the step's GPU work is done
            _sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
    finally:
        loop.close()
    first, times = times[0], times[size.warmup :]
    median = statistics.median(times)
    result: dict[str, Any] = {
        "case": name,
        "method": config.training.method.value,
        "gradientCheckpointing": config.training.gradient_checkpointing,
        "precision": precision,
        "optimizer": type(optimizer).__name__,
        "fused": bool(optimizer.defaults.get("fused")),
        "trainableParameters": trainable,
        "unetParameters": sum(p.numel() for p in comps.unet.parameters()),
        **timings,
        "warmupSteps": size.warmup,
        "timedSteps": size.steps,
        "msPerStepMedian": round(median * 1000, 2),
        "msPerStepMean": round(statistics.fmean(times) * 1000, 2),
        "msPerStepMin": round(min(times) * 1000, 2),
        "msPerStepMax": round(max(times) * 1000, 2),
        "stepsPerSecond": round(1.0 / median, 3),
        "firstStepSeconds": round(first, 3),
        "lossFirst": losses[0],
        "lossLast": losses[-1],
        "gpuMinutesPerSubject": {str(n): round(n * median / 60, 3) for n in SUBJECT_STEPS},
    }
    if device.type == "cuda":
        result["peakAllocatedGiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peakReservedGiB"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    del training, loop, module, comps, optimizer, fabric, dataset
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def benchmark(dry_run: bool = False) -> dict[str, Any]:
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    size = _Size(dry_run)
    out: dict[str, Any] = {
        "dryRun": dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "resolution": size.resolution,
        "batch": {"instance": 1, "class": 1, "effective": 2},
        "latentsCached": True,
        "timing": "synchronized wall time of TrainLoop.train_step; median of the timed steps",
        "gpuMinutesPerSubjectCovers": "the training loop only (no model load, class images, checkpoints, export)",
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-gpu-train-") as tmp:
        for name in CASES:
            start = time.perf_counter()
            try:
                out["cases"][name] = measure_case(name, size, device, Path(tmp))
            except torch.cuda.OutOfMemoryError as err:
                out["cases"][name] = {"case": name, "error": f"out of memory: {str(err)[:300]}"}
                gc.collect()
                torch.cuda.empty_cache()
            out["cases"][name]["caseSeconds"] = round(time.perf_counter() - start, 2)
            print(f"[bench_gpu_train] {name}: {json.dumps(out['cases'][name])}", flush=True)
    return out


def run(results_dir: Path, dry_run: bool = False) -> dict[str, Any]:
    if not dry_run and not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    result = benchmark(dry_run=dry_run)
    if not dry_run:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "gpu_train.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, few steps; writes nothing")
    args = parser.parse_args(argv)
    result = run(Path(__file__).parent / "results", dry_run=args.dry_run)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

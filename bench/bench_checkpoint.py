"""Checkpoint cost: size, write time, and the training stall per checkpoint.

Cases:
- `tiny-lora` and `tiny-full`: the tiny test model (DreamBoothModule, LoRA and full fine-tuning), on CPU.
- `sd15-unet-lora` and `sd15-unet-full`: a UNet with Stable Diffusion 1.5's architecture (860M parameters),
  random weights built from its config, on CUDA only (skipped without it).

For each case the optimizer has real AdamW state (one step on random gradients). Measured, median of `reps`:
- `stallSeconds`: what the training loop is blocked for: the CPU snapshot of weights, optimizer and scheduler
  state (`to_cpu`, or with `-pinned` the reused pinned `StagingBuffers` that TrainLoop uses on CUDA; its first
  snapshot allocates the buffers, see `stallSecondsEach`) and handing it to the background writer;
- `writeSeconds`: serialize + sha256 + store into a local `file://` folder, in the background thread (the same
  code path as S3, minus the network; S3 upload time is then bytes / bandwidth);
- `loadSeconds`: verify the manifest and read the checkpoint back;
- `bytes`: the checkpoint folder's size.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_gpu_train import SD15_UNET
from dreambooth_trainer.checkpoint import AsyncCheckpointer, CheckpointStore, Snapshot, StagingBuffers, to_cpu
from dreambooth_trainer.logging import EventLog
from dreambooth_trainer.storage import ObjectStore


class _Null:
    def write(self, _s: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _optimizer_with_state(params: list[torch.nn.Parameter]) -> tuple[torch.optim.Optimizer, Any]:
    fused = params[0].is_cuda
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def measure(
    name: str,
    trainable: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    reps: int,
    scratch: Path,
    staging: bool = False,
) -> dict[str, Any]:
    """`trainable` is a callable returning the trainable state dict (on the training device)."""
    log = EventLog(_Null())  # type: ignore[arg-type]
    store = CheckpointStore(ObjectStore(), (scratch / name).as_uri(), keep=2, scratch=scratch, log=log)
    writer = AsyncCheckpointer(store)
    buffers = StagingBuffers() if staging else None
    stalls, writes, loads = [], [], []
    size = 0
    for step in range(1, reps + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if buffers is not None:
            writer.wait()  # as TrainLoop.snapshot: the buffers hold the previous snapshot until it is written
        snap = Snapshot(
            step=step,
            trainable=buffers.snapshot(trainable(), "t") if buffers else to_cpu(trainable()),
            optimizer=buffers.snapshot(optimizer.state_dict(), "o") if buffers else to_cpu(optimizer.state_dict()),
            scheduler=to_cpu(scheduler.state_dict()),
            state={"sampler": {"position": step}},
            config={},
        )
        writer.submit(snap)
        stalls.append(time.perf_counter() - t0)
        writer.wait()
        assert writer.stats.last is not None
        assert writer.stats.last.step == step, f"{name}: checkpoint {step} failed"
        writes.append(writer.stats.last.upload_seconds)
        size = writer.stats.last.bytes
        t2 = time.perf_counter()
        loaded = store.load(step)
        loads.append(time.perf_counter() - t2)
        assert loaded.info.step == step
        del loaded, snap
    writer.close()
    params = sum(v.numel() for k, v in trainable().items() if v.is_floating_point())
    return {
        "case": name + ("-pinned" if staging else ""),
        "device": str(next(iter(trainable().values())).device),
        "trainableParameters": params,
        "bytes": size,
        "staging": "pinned, reused" if staging else "pageable (to_cpu)",
        "stallSeconds": round(statistics.median(stalls), 4),
        "stallSecondsEach": [round(x, 4) for x in stalls],
        "writeSeconds": round(statistics.median(writes), 4),
        "loadSeconds": round(statistics.median(loads), 4),
        "writeMBps": round(size / 1e6 / statistics.median(writes), 1),
        "reps": reps,
    }


def _tiny_cases(scratch: Path) -> list[dict[str, Any]]:
    from dreambooth_api.config import Method, TrainingConfig
    from dreambooth_trainer.components import load_components_from_dir
    from dreambooth_trainer.module import DreamBoothModule
    from dreambooth_trainer.tiny import build_tiny_pipeline

    model_dir = build_tiny_pipeline(scratch / "tiny-model")
    out = []
    for method in (Method.LORA, Method.FULL):
        comps = load_components_from_dir(model_dir)
        module = DreamBoothModule(comps, TrainingConfig(method=method, resolution=32))
        optimizer, scheduler = _optimizer_with_state([p for p in module.parameters() if p.requires_grad])
        out.append(measure(f"tiny-{method.value}", module.trainable_state_dict, optimizer, scheduler, 5, scratch))
    return out


def _sd15_shapes() -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Parameter shapes, and [out, in] of every Linear, of the SD 1.5 UNet: built on the meta device with
    diffusers, or read from BENCH_SD15_SHAPES (a JSON file that this function's output was saved to) where
    diffusers cannot be imported."""
    path = os.environ.get("BENCH_SD15_SHAPES")
    if path:
        data = json.loads(Path(path).read_text())
        return data["params"], data["linears"]
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    params = {n: list(p.shape) for n, p in unet.named_parameters()}
    linears = {n: [m.out_features, m.in_features] for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    return params, linears


def _sd15_params(method: str, rank: int = 8) -> dict[str, torch.nn.Parameter]:
    """Random CUDA parameters shaped as the SD 1.5 UNet's (full) or as rank-8 LoRA A/B matrices on its attention
    projections to_q, to_k, to_v, to_out.0 (as peft makes them). A checkpoint depends only on names and shapes."""
    shapes, linears = _sd15_shapes()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if method == "full":
        return {n: torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * 0.02) for n, s in shapes.items()}
    out = {}
    for name, (fan_out, fan_in) in linears.items():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            a = torch.randn(rank, fan_in, device="cuda", generator=gen) * 0.01
            out[f"{name}.lora_A.weight"] = torch.nn.Parameter(a)
            out[f"{name}.lora_B.weight"] = torch.nn.Parameter(torch.zeros(fan_out, rank, device="cuda"))
    return out


def _sd15_cases(scratch: Path) -> list[dict[str, Any]]:
    out = []
    # (method, repetitions, staging): the full model's pageable baseline runs in the same process as the pinned one.
    for method, plan in (("lora", ((3, True),)), ("full", ((1, False), (3, True)))):
        params = _sd15_params(method)
        optimizer, scheduler = _optimizer_with_state(list(params.values()))

        def trainable(params: dict[str, torch.nn.Parameter] = params) -> dict[str, torch.Tensor]:
            return {n: p.detach() for n, p in params.items()}

        for reps, staging in plan:
            out.append(measure(f"sd15-unet-{method}", trainable, optimizer, scheduler, reps, scratch, staging))
        del optimizer, scheduler, params
        torch.cuda.empty_cache()
    return out


def _earlier_cuda_cases(path: Path) -> list[dict[str, Any]]:
    """The CUDA cases of an earlier run: a CPU-only run keeps them (marked) instead of erasing them."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [
        dict(c, fromEarlierRun=True)
        for c in earlier.get("cases", [])
        if isinstance(c, dict) and str(c.get("device", "")).startswith("cuda")
    ]


def run(results_dir: Path) -> dict[str, Any]:
    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        scratch = Path(tmp)
        # BENCH_CHECKPOINT_SKIP_TINY=1 runs only the CUDA cases (for a GPU machine without the full stack).
        cases = [] if os.environ.get("BENCH_CHECKPOINT_SKIP_TINY") == "1" else _tiny_cases(scratch)
        if torch.cuda.is_available():
            cases += _sd15_cases(scratch)
    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    cases = [dict(c, machine=machine) for c in cases]
    if not torch.cuda.is_available():
        cases += _earlier_cuda_cases(results_dir / "checkpoint.json")
    result: dict[str, Any] = {
        "cases": cases,
        "notes": "stall = CPU snapshot + submit (the loop is blocked); write = serialize + sha256 + file:// store "
        "in the background thread; S3 upload adds bytes / bandwidth to write, not to stall.",
    }
    (results_dir / "checkpoint.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))

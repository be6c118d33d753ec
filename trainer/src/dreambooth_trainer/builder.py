"""Assemble one process's training: its Lightning Fabric, the `DreamBoothModule` on the loaded components, and the
`TrainLoop` around them.

`build_training` is the one place that wires the loop. The job runner (`job.py`), the GPU benchmark
(`bench/bench_gpu_train.py`) and the GPU tests (`tests/gpu/conftest.py`) all call it, so what they measure and
test is what a job runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies.ddp import DDPStrategy

from dreambooth_api.config import JobConfig, MixedPrecision
from dreambooth_trainer.components import Components
from dreambooth_trainer.data import collate_fn
from dreambooth_trainer.distributed import read_env
from dreambooth_trainer.logging import EventLog
from dreambooth_trainer.loop import TrainLoop
from dreambooth_trainer.module import DreamBoothModule
from dreambooth_trainer.preemption import Preemption
from dreambooth_trainer.progress import Progress
from dreambooth_trainer.storage import ObjectStore


def fabric_precision(config: JobConfig, cuda: bool) -> str:
    """Fabric's precision plugin for `training.mixedPrecision` (full precision without CUDA)."""
    mp = config.training.mixed_precision
    if mp is MixedPrecision.NO or not cuda:
        return "32-true"
    return "16-mixed" if mp is MixedPrecision.FP16 else "bf16-mixed"


def frozen_dtype(config: JobConfig, cuda: bool) -> torch.dtype | None:
    """The dtype of the frozen weights under mixed precision (None: they stay fp32)."""
    return {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(fabric_precision(config, cuda))


def configure_cuda_math(config: JobConfig) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions, as `training.allowTf32` says (ignored without CUDA)."""
    torch.backends.cuda.matmul.allow_tf32 = config.training.allow_tf32
    torch.backends.cudnn.allow_tf32 = config.training.allow_tf32


def make_fabric(config: JobConfig, *, local: bool = False) -> Any:
    """A Fabric for this process: DDP over PET_NNODES x PET_NPROC_PER_NODE (gloo on CPU), or one process."""
    dist = read_env({} if local else None)
    cuda = torch.cuda.is_available()
    strategy: Any = "auto"
    if dist.is_distributed:
        for key, value in dist.lightning_env().items():
            os.environ.setdefault(key, value)
        t = config.training
        strategy = DDPStrategy(
            process_group_backend="nccl" if cuda else "gloo",
            find_unused_parameters=bool(t.train_text_encoder and t.text_encoder_steps is not None),
        )
    return Fabric(
        accelerator="cuda" if cuda else "cpu",
        devices=dist.procs_per_node,
        num_nodes=dist.num_nodes,
        strategy=strategy,
        precision=fabric_precision(config, cuda),  # type: ignore[arg-type]
    )


@dataclass
class Training:
    """An assembled training: the module and the loop that set it up with its optimizer on the Fabric."""

    module: DreamBoothModule
    loop: TrainLoop

    @property
    def optimizer(self) -> Any:
        """The optimizer as Fabric wrapped it (`.optimizer` is the torch one)."""
        return self.loop.optimizer


def build_training(
    config: JobConfig,
    components: Components,
    dataset: Sequence[Any],
    *,
    fabric: Any,
    store: ObjectStore,
    preemption: Preemption,
    progress: Progress | None = None,
    log: EventLog | None = None,
    scratch: Path | None = None,
    collate: Callable[[list[Any]], Any] = collate_fn,
) -> Training:
    """The `DreamBoothModule` on `components` (frozen weights cast for mixed precision) and its `TrainLoop`, with
    the optimizer and LR schedule set up on the launched `fabric`. The module draws its adapters' initial weights
    from the global RNG: seed it first for a reproducible run (the job runner seeds `training.seed`)."""
    module = DreamBoothModule(components, config.training, prior_loss_weight=config.prior_preservation.loss_weight)
    dtype = frozen_dtype(config, torch.cuda.is_available())
    if dtype is not None:
        module.cast_frozen(dtype)
    loop = TrainLoop(
        fabric=fabric,
        config=config,
        module=module,
        dataset=dataset,
        collate=collate,
        store=store,
        progress=progress,
        preemption=preemption,
        log=log,
        scratch=scratch,
    )
    return Training(module, loop)

"""One training job in this process: the orchestration around the loop.

`run_job` launches Fabric, serves progress, refuses another run's output, loads the base model, prepares the data
(instance images, class priors, caches), builds the training (`builder.build_training`), runs the loop (resume,
checkpoints, preemption), exports the model and returns the result document (docs/contracts.md).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreambooth_api import env
from dreambooth_api.config import JobConfig
from dreambooth_api.exitcodes import ExitCode, StoppedError
from dreambooth_api.progress import TrainerPhase
from dreambooth_trainer import compilation, rng
from dreambooth_trainer.builder import build_training, configure_cuda_math, make_fabric
from dreambooth_trainer.checkpoint import CheckpointStore, run_fingerprint
from dreambooth_trainer.cli import classify
from dreambooth_trainer.components import Components, load_components, model_cache_dir
from dreambooth_trainer.distributed import (
    agree_any,
    global_rank,
    leave,
    on_all_ranks,
    on_rank0,
    raised_on_all_ranks,
    read_env,
    serve_rendezvous,
)
from dreambooth_trainer.evaluation import stage as evaluation
from dreambooth_trainer.export import export_model
from dreambooth_trainer.logging import EventLog
from dreambooth_trainer.logging import log as default_log
from dreambooth_trainer.module import DreamBoothModule
from dreambooth_trainer.preemption import Preemption
from dreambooth_trainer.prepare import prepare_dataset
from dreambooth_trainer.progress import Progress, ProgressServer
from dreambooth_trainer.result import RunResult
from dreambooth_trainer.storage import ObjectStore, join_uri
from dreambooth_trainer.validation import sample_and_upload


@dataclass
class JobContext:
    """What one process of a run shares between its phases."""

    config: JobConfig
    store: ObjectStore
    workdir: Path
    preemption: Preemption
    log: EventLog
    progress: Progress
    fabric: Any
    started: float = field(default_factory=time.monotonic)

    @property
    def is_main(self) -> bool:
        return int(self.fabric.global_rank) == 0


def build_dataset(ctx: JobContext, components: Components) -> Any:
    """Instance images, class priors (generated split across ranks, or reused) and caches: `prepare_dataset`.

    The ranks meet once after class-image generation. A rank stopped by a signal between generation batches still
    meets the others there, and they all stop together (StoppedError on every rank); otherwise a rank that left
    would leave its peers waiting in that collective (a crash with gloo, a hang with NCCL)."""

    def on_phase(phase: str) -> None:
        ctx.progress.set_phase(TrainerPhase(phase))
        ctx.log.info("phase", phase=phase)

    met: list[bool] = []

    def meet() -> None:
        met.append(True)
        _stop_if_requested(ctx, "generating class images")

    try:
        dataset = prepare_dataset(
            ctx.config,
            components,
            ctx.store,
            rank=int(ctx.fabric.global_rank),
            world_size=int(ctx.fabric.world_size),
            device=ctx.fabric.device,
            barrier=meet,
            on_phase=on_phase,
            should_stop=lambda: ctx.preemption.requested,
        )
    except StoppedError as err:
        if not met:  # stopped between generation batches: the others wait for this rank where they meet
            agree_any(ctx.fabric, True)
        raise on_all_ranks(err) from None
    ctx.progress.set_phase(TrainerPhase.INITIALIZING)
    ctx.log.info("dataset_ready", items=len(dataset), withPrior=bool(getattr(dataset, "with_prior", False)))
    return dataset


def run_job(
    config: JobConfig,
    *,
    preemption: Preemption,
    log: EventLog | None = None,
    workdir: Path | None = None,
    local: bool = False,
    fabric: Any = None,
    serve: bool = True,
) -> tuple[str, dict[str, Any]]:
    """Train, validate and export one job. Returns (status, result document); raises TrainerError subclasses."""
    log = log or default_log
    configure_cuda_math(config)
    if fabric is None:
        fabric = make_fabric(config, local=local)
        if not local:  # before Fabric starts the process group: rank 0 serves its rendezvous on MASTER_ADDR only
            dist_env = read_env()
            serve_rendezvous(dist_env, global_rank(dist_env))
    fabric.launch()
    rank = int(fabric.global_rank)
    log.bind(rank=rank, attempt=int(os.environ.get(env.ATTEMPT, "0") or 0))
    progress = Progress(config.name, config.namespace, rank, config.training.max_steps)
    server = None
    if serve and int(fabric.local_rank) == 0:
        host = "127.0.0.1" if local and not os.environ.get(env.BIND_ADDRESS) else None
        server = ProgressServer(progress, host=host).start()
        log.info("progress_server", port=server.port)
    scratch = Path(workdir or os.environ.get(env.WORKDIR) or Path.cwd() / ".dreambooth")
    scratch = scratch / f"rank-{rank}"
    scratch.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(config, ObjectStore(config.storage), scratch, preemption, log, progress, fabric)
    try:
        outcome = _run(ctx)
    except BaseException as err:
        progress.set_phase(TrainerPhase.FAILED)
        leave(fabric, together=raised_on_all_ranks(err), log=log)
        raise
    else:
        leave(fabric, together=True, log=log)
        return outcome
    finally:
        if server is not None:
            server.stop()


def _run(ctx: JobContext) -> tuple[str, dict[str, Any]]:
    cfg = ctx.config
    t = cfg.training
    fabric = ctx.fabric
    log = ctx.log

    def claim_output() -> None:
        # Another run's checkpoints under this output: refuse before overwriting its config.json.
        CheckpointStore(
            ctx.store, cfg.output.resolved_checkpoint_uri(), fingerprint=run_fingerprint(cfg)
        ).check_compatible()
        ctx.store.write_bytes(join_uri(cfg.output.uri, "config.json"), json.dumps(cfg.to_wire(), indent=2).encode())
        log.info("started", job=cfg.name, totalSteps=t.max_steps, worldSize=int(fabric.world_size))

    on_rank0(fabric, claim_output, classify)  # its refusal or storage error stops every rank here
    if t.compile_unet:
        compilation.prepare(cuda=torch.cuda.is_available())
    rng.seed_all(t.seed)
    components = load_components(cfg.base_model, ctx.store, model_cache_dir(ctx.workdir.parent / "models"))
    _stop_if_requested(ctx, "loading the base model")
    evaluation.captions_before_training(fabric, cfg, ctx.store, log)
    dataset = build_dataset(ctx, components)
    evaluation.record_prompts_of(fabric, cfg, dataset, ctx.store, log)
    _stop_if_requested(ctx, "preparing the data")
    rng.seed_all(t.seed)  # the LoRA adapters' initial weights come from the global generator
    training = build_training(
        cfg,
        components,
        dataset,
        fabric=fabric,
        store=ctx.store,
        preemption=ctx.preemption,
        progress=ctx.progress,
        log=log,
        scratch=ctx.workdir,
    )
    module, loop = training.module, training.loop
    loop.on_step_end = _validator(ctx, module)
    try:
        outcome = loop.run()
    finally:
        abandoned = loop.close()
    if abandoned and outcome.status == "preempted":
        # Transfer threads of the abandoned upload would keep the interpreter from exiting until SIGKILL (137).
        ctx.preemption.exit_at_grace_end(int(ExitCode.PREEMPTED))
    duration = time.monotonic() - ctx.started
    last = outcome.last_checkpoint.to_wire() if outcome.last_checkpoint else None
    if outcome.status == "preempted":
        result = RunResult(
            status="preempted",
            reason="Preempted",
            message=f"stopped at step {outcome.step} by {ctx.preemption.signal_name or 'a signal'}",
            steps=outcome.step,
            final_loss=outcome.final_loss,
            duration_seconds=duration,
            last_checkpoint=last,
        )
        log.info("preempted", step=outcome.step, lastCheckpoint=last)
        return "preempted", result.to_wire()
    final_loss = outcome.final_loss
    if final_loss is None:
        final_loss = loop.metrics.last_loss()
    if ctx.is_main:
        ctx.progress.set_phase(TrainerPhase.EXPORTING)
    # Rank 0 exports; its outcome (an error too) reaches every rank, so none waits for a rank that failed.
    model_uri = on_rank0(fabric, lambda: _export(ctx, module, outcome.step, final_loss), classify)
    result = RunResult(
        status="succeeded",
        model_uri=model_uri,
        samples_uri=join_uri(cfg.output.uri, "samples") if cfg.training.validation.prompts else None,
        steps=outcome.step,
        final_loss=final_loss,
        duration_seconds=duration,
        last_checkpoint=last,
    )
    cache = model_cache_dir(ctx.workdir.parent / "models")
    evaluated = evaluation.evaluate_after_export(
        fabric, cfg, module, ctx.store, ctx.workdir, cache, log, progress=ctx.progress
    )
    ctx.progress.set_phase(TrainerPhase.SUCCEEDED)
    return "succeeded", {**result.to_wire(), **evaluated}


def _stop_if_requested(ctx: JobContext, stage: str) -> None:
    """Before training has started there is nothing to checkpoint: a preemption signal ends the run at once, on
    every rank together (a rank that got no signal learns of its peer's here)."""
    if agree_any(ctx.fabric, ctx.preemption.requested):
        by = ctx.preemption.signal_name or ("a signal" if ctx.preemption.requested else "a signal to another rank")
        raise on_all_ranks(StoppedError(f"stopped by {by} after {stage}, before training"))


def _validator(ctx: JobContext, module: DreamBoothModule) -> Callable[[int], None] | None:
    """Rank 0 samples the validation prompts every `intervalSteps`, at the last step, and at step 0 of a fresh run
    when `beforeTraining` is set."""
    v = ctx.config.training.validation
    if not v.prompts or not ctx.is_main:
        return None
    total = ctx.config.training.max_steps
    # TensorBoard event files are written locally and mirrored to <output>/tensorboard/ after each validation,
    # so `tensorboard --logdir <output>/tensorboard` shows the samples over steps.
    tensorboard_dir = ctx.workdir / "tensorboard"
    tensorboard_uri = f"{ctx.config.output.uri.rstrip('/')}/tensorboard"

    def hook(step: int) -> None:
        if step == 0 and not v.before_training:
            return
        if step % v.interval_steps == 0 or step == total:
            uris = sample_and_upload(ctx.config, module, ctx.store, step, tensorboard_dir=tensorboard_dir)
            ctx.store.upload_dir(tensorboard_dir, tensorboard_uri)
            ctx.log.info("validation", step=step, images=len(uris), tensorboard=tensorboard_uri)

    return hook


def _export(ctx: JobContext, module: DreamBoothModule, steps: int, final_loss: float | None) -> str | None:
    exported = export_model(module, ctx.config, ctx.store, ctx.workdir / "export", steps=steps, final_loss=final_loss)
    ctx.log.info("exported", uri=exported.model_uri, uris=exported.uris)
    return exported.model_uri or None

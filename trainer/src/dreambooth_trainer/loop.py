"""The training loop: a custom Lightning Fabric loop with step checkpoints, exact resume and preemption.

`TrainLoop` drives any module with `compute_loss(batch)`, `configure_optimizers()`,
`trainable_state_dict()` and `load_trainable_state_dict()` (the `DreamBoothModule`) over an indexable dataset;
`builder.build_training` assembles it around a `DreamBoothModule`. What it guarantees:

- Exact resume. Every micro-batch reseeds python/numpy/torch from (seed, slot, step) (`rng.seed_step`),
  the sampler's position is a function of the step, and the checkpoint restores weights, optimizer, LR
  scheduler, grad scaler and RNG states. A run stopped at step k and resumed in a new process ends with the
  same weights as an uninterrupted run (bitwise on CPU; tests/integration/test_trainer_resume.py).
- Checkpoints every `intervalSteps` and/or `intervalSeconds`, and at the last step. The loop is blocked only
  for the CPU snapshot (and for an upload still in flight); serialization and upload run in a background thread.
- SIGTERM (`Preemption`): the current step finishes, a checkpoint is written synchronously before the grace
  deadline, and `run()` returns a "preempted" result.
- Distributed: all ranks agree on every step whether to checkpoint or stop (one small all-reduce per step,
  which also averages the logged loss). Rank 0 writes checkpoints; every rank loads the step rank 0 chose.
- Only a compatible run resumes: checkpoints carry the `run_fingerprint` of their config, and one written with
  other settings fails the job as invalid input.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dreambooth_api import env
from dreambooth_api.config import JobConfig
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.progress import TrainerPhase
from dreambooth_trainer import rng
from dreambooth_trainer.checkpoint import (
    AsyncCheckpointer,
    CheckpointInfo,
    CheckpointStore,
    Loaded,
    Snapshot,
    StagingBuffers,
    resume_refusal,
    run_fingerprint,
    to_cpu,
)
from dreambooth_trainer.distributed import broadcast_object
from dreambooth_trainer.logging import EventLog, utc_now_iso
from dreambooth_trainer.logging import log as default_log
from dreambooth_trainer.module import build_lr_scheduler, split_optimizers
from dreambooth_trainer.preemption import Preemption
from dreambooth_trainer.progress import Progress
from dreambooth_trainer.sampler import ResumableSampler
from dreambooth_trainer.step_metrics import StepMetrics
from dreambooth_trainer.storage import ObjectStore, join_uri

DEFAULT_LOG_INTERVAL_SECONDS = 1.0


def log_interval_seconds() -> float:
    try:
        return float(os.environ.get(env.LOG_INTERVAL_SECONDS, DEFAULT_LOG_INTERVAL_SECONDS))
    except ValueError:
        return DEFAULT_LOG_INTERVAL_SECONDS


@dataclass
class LoopOutcome:
    status: str
    """completed or preempted."""
    step: int
    final_loss: float | None
    last_checkpoint: CheckpointInfo | None
    resumed_from: int | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)


class _Due:
    """When the next checkpoint is due (step and/or seconds cadence)."""

    def __init__(self, every_steps: int | None, every_seconds: int | None) -> None:
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.last = time.monotonic()

    def by_steps(self, step: int) -> bool:
        return self.every_steps is not None and step % self.every_steps == 0

    def by_time(self) -> bool:
        return self.every_seconds is not None and time.monotonic() - self.last >= self.every_seconds

    def reset(self) -> None:
        self.last = time.monotonic()


class TrainLoop:
    """One rank's loop. `fabric` is already launched; `module` is not yet set up."""

    def __init__(
        self,
        *,
        fabric: Any,
        config: JobConfig,
        module: Any,
        dataset: Sequence[Any],
        collate: Callable[[list[Any]], Any],
        store: ObjectStore,
        progress: Progress | None,
        preemption: Preemption,
        log: EventLog | None = None,
        scratch: Path | None = None,
        on_step_end: Callable[[int], None] | None = None,
    ) -> None:
        self.fabric = fabric
        self.config = config
        self.t = config.training
        self.log = log or default_log
        self.store = store
        self.progress = progress
        self.preemption = preemption
        self.dataset = dataset
        self.collate = collate
        self.on_step_end = on_step_end
        self.rank = int(fabric.global_rank)
        self.world = int(fabric.world_size)
        self.is_main = self.rank == 0
        self.output_uri = config.output.uri.rstrip("/")
        self.metrics = StepMetrics(store, join_uri(self.output_uri, "metrics.jsonl"))
        self.ckpt = CheckpointStore(
            store,
            config.output.resolved_checkpoint_uri(),
            keep=self.t.checkpoint.keep,
            scratch=scratch,
            log=self.log,
            fingerprint=run_fingerprint(config),
        )
        self.writer = (
            AsyncCheckpointer(self.ckpt, on_complete=self._on_checkpoint, on_failure=self._on_checkpoint_failure)
            if self.is_main
            else None
        )
        self.sampler = ResumableSampler(
            len(dataset), self.t.batch_size, seed=self.t.seed, rank=self.rank, world_size=self.world
        )
        self.last_checkpoint: CheckpointInfo | None = None
        self._log_every: float = log_interval_seconds()
        self._last_log: float = 0.0
        # Pinned, reused snapshot buffers on CUDA (rank 0 only; see checkpoint.StagingBuffers).
        self._staging = StagingBuffers() if self.is_main and torch.cuda.is_available() else None

        configured = module.configure_optimizers()
        optimizer, scheduler = split_optimizers(configured)
        self.scheduler = scheduler if scheduler is not None else build_lr_scheduler(optimizer, config.training)
        self.model, self.optimizer = fabric.setup(module, optimizer)
        if hasattr(self.model, "mark_forward_method"):
            self.model.mark_forward_method("compute_loss")
        self.module = module

    # ----- callbacks from the upload thread --------------------------------------------------------------
    def _on_checkpoint(self, info: CheckpointInfo) -> None:
        self.last_checkpoint = info
        if self.progress:
            self.progress.on_checkpoint(info.step, info.uri, info.time, info.bytes, info.upload_seconds)

    def _on_checkpoint_failure(self, _step: int, _err: BaseException) -> None:
        if self.progress:
            self.progress.on_checkpoint_failure()

    # ----- state ---------------------------------------------------------------------------------------------
    def _scaler(self) -> Any:
        return getattr(getattr(self.fabric, "_precision", None), "scaler", None)

    def _gather_rng(self) -> list[dict[str, Any]]:
        state = rng.capture()
        if self.world == 1:
            return [state]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, state)
        return out

    def snapshot(self, step: int, deadline: float | None = None) -> Snapshot | None:
        """Every rank calls this (the RNG gather is collective); rank 0 gets the snapshot. Rank 0 first waits for
        the upload in flight (the staging buffers hold it); None when that is not done by `deadline`."""
        rngs = self._gather_rng()
        if not self.is_main:
            return None
        scaler = self._scaler()
        if self.writer is not None:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not self.writer.wait(timeout):
                return None
        copy = self._staging.snapshot if self._staging is not None else (lambda obj, _name: to_cpu(obj))
        return Snapshot(
            step=step,
            trainable=copy(self.module.trainable_state_dict(), "trainable"),
            optimizer=copy(self.optimizer.state_dict(), "optimizer"),
            scheduler=to_cpu(self.scheduler.state_dict()) if self.scheduler is not None else None,
            scaler=scaler.state_dict() if scaler is not None else None,
            state={
                "sampler": self.sampler.state_dict(),
                "rng": rngs,
                "worldSize": self.world,
                "time": utc_now_iso(),
                "metricsLines": len(self.metrics.lines),
            },
            config=self.config.to_wire(),
        )

    def restore(self, loaded: Loaded) -> None:
        self.module.load_trainable_state_dict(loaded.trainable)
        self.optimizer.load_state_dict(loaded.optimizer)
        if self.scheduler is not None and loaded.scheduler is not None:
            self.scheduler.load_state_dict(loaded.scheduler)
        scaler = self._scaler()
        if scaler is not None and loaded.scaler:
            scaler.load_state_dict(loaded.scaler)
        self.sampler.load_state_dict(loaded.state["sampler"])
        rngs = loaded.state.get("rng") or []
        if rngs and int(loaded.state.get("worldSize", 1)) == self.world:
            rng.restore(rngs[self.rank])
        self.last_checkpoint = loaded.info

    def resume(self) -> int:
        """Rank 0 finds the newest verified checkpoint and broadcasts its step; every rank loads it. Raises
        RetryableError when storage fails and InvalidInputError for another run's checkpoint, never starting over."""
        step: int | None = None
        loaded: Loaded | None = None
        if self.is_main:
            loaded = self.ckpt.load_latest()
            refusal = resume_refusal(loaded, self.t.max_steps) if loaded else None
            if refusal is not None:
                raise InvalidInputError(refusal)
            step = loaded.info.step if loaded else None
        step = broadcast_object(self.fabric, step)
        if step is None:
            return 0
        if loaded is None:
            loaded = self.ckpt.load(step)
        self.restore(loaded)
        if self.is_main:
            self.metrics.load(step)
            self.log.info("resumed", step=step, uri=loaded.info.uri)
            if self.progress:
                self.progress.on_resume(step)
                self.progress.state.update(last_checkpoint=loaded.info.to_wire())
        return step

    def trainable_digest(self) -> str:
        """sha256 over the trainable tensors (names, dtypes, bytes): equal on every rank of a healthy DDP run."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.module.trainable_state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def upload_metrics(self) -> None:
        if self.is_main:
            self.metrics.upload()

    # ----- the loop ------------------------------------------------------------------------------------------
    def _agree(self, loss: float, *flags: bool) -> tuple[float, list[bool]]:
        """Average the loss and OR the flags over ranks (one all-reduce)."""
        if self.world == 1:
            return loss, list(flags)
        t = torch.tensor([loss, *[1.0 if f else 0.0 for f in flags]], dtype=torch.float64, device=self.fabric.device)
        dist.all_reduce(t)
        values = t.tolist()
        return values[0] / self.world, [v > 0 for v in values[1:]]

    def _checkpoint_async(self, step: int) -> None:
        start = time.monotonic()
        if self.progress:
            self.progress.set_phase(TrainerPhase.CHECKPOINTING)
        snap = self.snapshot(step)
        if self.writer is not None and snap is not None:
            self.writer.submit(snap, after=self.metrics.uploader())
        stall = time.monotonic() - start
        if self.progress:
            self.progress.on_stall(stall)
            self.progress.set_phase(TrainerPhase.TRAINING)
        if self.is_main:
            self.log.info("checkpoint_started", step=step, stallSeconds=round(stall, 4))

    def checkpoint_sync(self, step: int, deadline: float | None) -> CheckpointInfo | None:
        snap = self.snapshot(step, deadline)
        if self.writer is None:
            return None
        info = self.writer.write_sync(snap, deadline) if snap is not None else None
        if info is None:
            self.log.warning("checkpoint_incomplete", step=step, reason="deadline" if deadline else "failed")
        return info

    def _fetch(self) -> Any:
        items = []
        set_epoch = getattr(self.dataset, "set_epoch", None)
        for epoch, index in self.sampler.next_batch_with_epochs():
            if set_epoch is not None:
                set_epoch(epoch)
            items.append(self.dataset[index])
        return self.fabric.to_device(self.collate(items))

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step (all micro-batches) starting at `step`; returns (mean loss, data-wait seconds)."""
        fabric = self.fabric
        accum = self.t.gradient_accumulation
        data_wait = 0.0
        total = 0.0
        for micro in range(accum):
            rng.seed_step(self.t.seed, micro * self.world + self.rank, step)
            t0 = time.monotonic()
            batch = self._fetch()
            data_wait += time.monotonic() - t0
            with fabric.no_backward_sync(self.model, enabled=micro < accum - 1):
                loss = self.model.compute_loss(batch)
                fabric.backward(loss / accum)
            total += float(loss.detach()) / accum
        if self.t.max_grad_norm is not None:
            self._clip_gradients(self.t.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, data_wait

    def _clip_gradients(self, max_norm: float) -> None:
        scaler = self._scaler()
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if scaler is not None and getattr(inner, "_step_supports_amp_scaling", False):
            # fp16 with fused AdamW: Fabric refuses to unscale for optimizers that unscale themselves, but
            # GradScaler supports it (its step() then skips unscaling); found on an H200.
            scaler.unscale_(inner)
            params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            self.fabric.clip_gradients(self.model, self.optimizer, max_norm=max_norm)

    def _record(self, step: int, loss: float, data_wait: float, force_log: bool) -> None:
        """Progress on every rank; rank 0 also keeps metrics.jsonl and logs the (rate-limited) `step` event."""
        t = self.t
        lr = float(self.optimizer.param_groups[0]["lr"])
        if self.progress:
            self.progress.on_step(step, loss, lr, t.batch_size * t.gradient_accumulation, data_wait)
        if not self.is_main:
            return
        self.metrics.append(step, loss, lr)
        now = time.monotonic()
        if force_log or now - self._last_log >= self._log_every:
            self._last_log = now
            doc = self.progress.state.document if self.progress else None
            self.log.info(
                "step",
                step=step,
                totalSteps=t.max_steps,
                loss=loss,
                lr=lr,
                stepsPerSecond=doc.steps_per_second if doc else None,
                etaSeconds=doc.eta_seconds if doc else None,
            )

    def run(self) -> LoopOutcome:
        t = self.t
        start_step = self.resume()
        resumed_from = start_step or None
        due = _Due(t.checkpoint.interval_steps, t.checkpoint.interval_seconds)
        if self.progress:
            self.progress.set_phase(TrainerPhase.TRAINING)
        if self.is_main:
            self.log.info("training_started", step=start_step, totalSteps=t.max_steps, worldSize=self.world)
        self._log_every = log_interval_seconds()
        self._last_log = 0.0
        loss: float | None = None
        losses: list[tuple[int, float]] = []
        self.model.train()
        step = start_step
        if start_step == 0 and self.on_step_end is not None:
            self.on_step_end(0)  # the hook decides whether a fresh run wants anything at step 0
        _, (stop_now,) = self._agree(0.0, self.preemption.requested)
        if stop_now:  # stopped during setup: nothing new to save
            return self._preempted(step, None, resumed_from, [])
        while step < t.max_steps:
            local_loss, data_wait = self.train_step(step)
            step += 1
            if self.on_step_end is not None:
                self.on_step_end(step)
            loss, (stop, time_due) = self._agree(local_loss, self.preemption.requested, due.by_time())
            losses.append((step, loss))
            self._record(step, loss, data_wait, force_log=stop or step in (start_step + 1, t.max_steps))
            if stop:
                return self._preempted(step, loss, resumed_from, losses)
            if step < t.max_steps and (due.by_steps(step) or time_due):
                self._checkpoint_async(step)
                due.reset()
        self.log.info("training_finished", step=step, trainableDigest=self.trainable_digest())
        # A final checkpoint lets a retry after a failed export skip training.
        if resumed_from != step:
            info = self.checkpoint_sync(step, None)
            self.last_checkpoint = info or self.last_checkpoint
        self.upload_metrics()
        return LoopOutcome("completed", step, loss, self.last_checkpoint, resumed_from, losses)

    def _preempted(
        self, step: int, loss: float | None, resumed_from: int | None, losses: list[tuple[int, float]]
    ) -> LoopOutcome:
        if self.progress:
            self.progress.set_phase(TrainerPhase.CHECKPOINTING)
        deadline = self.preemption.deadline()
        if self.is_main:
            self.log.info(
                "preempting",
                step=step,
                signal=self.preemption.signal_name,
                secondsLeft=round(self.preemption.seconds_left(), 2),
            )
        info = None
        if step != (resumed_from or 0):
            info = self.checkpoint_sync(step, deadline)
        if info is not None:
            self.last_checkpoint = info
            try:
                self.upload_metrics()
            except Exception as err:
                self.log.warning("metrics_upload_failed", error=str(err))
        if self.progress:
            self.progress.set_phase(TrainerPhase.PREEMPTED)
        return LoopOutcome("preempted", step, loss, self.last_checkpoint, resumed_from, losses)

    def close(self) -> bool:
        """Stop the upload thread. After a preemption it waits only until the preemption deadline; True when an
        upload was left running then (cancelled before its manifest), so the process must not wait for it."""
        if self.writer is None:
            return False
        deadline = self.preemption.deadline() if self.preemption.requested else None
        left = self.writer.close(deadline=deadline)
        if left is not None:
            self.log.warning("checkpoint_incomplete", step=left, reason="abandoned")
        return left is not None

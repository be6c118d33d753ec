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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dreambooth_api.config import JobConfig
from dreambooth_api.exitcodes import ExitCode, InvalidInputError, LossDivergedError
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
from dreambooth_trainer.cli import classify
from dreambooth_trainer.distributed import PeerError, agree_any, on_all_ranks, on_rank0
from dreambooth_trainer.gradients import clip_gradients
from dreambooth_trainer.logging import EventLog, utc_now_iso
from dreambooth_trainer.logging import log as default_log
from dreambooth_trainer.loop_state import (
    MAX_PENDING,
    CheckpointDue,
    Divergence,
    LoopOutcome,
    RunState,
    log_interval_seconds,
)
from dreambooth_trainer.module import build_lr_scheduler, split_optimizers
from dreambooth_trainer.preemption import Preemption
from dreambooth_trainer.progress import Progress
from dreambooth_trainer.sampler import ResumableSampler
from dreambooth_trainer.step_metrics import StepMetrics
from dreambooth_trainer.storage import ObjectStore, join_uri


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

    def snapshot(self, step: int, deadline: float | None = None) -> Snapshot | None:
        """Every rank calls this (the RNG gather is collective); rank 0 gets the snapshot. Rank 0 first waits for
        the upload in flight (the staging buffers hold it); None when that is not done by `deadline`."""
        rngs = rng.gather(self.world)
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
        """Rank 0 finds the newest verified checkpoint and broadcasts its step (or its error: every rank raises it
        together); every rank loads it. Raises RetryableError when storage fails and InvalidInputError for another
        run's checkpoint, never starting over."""
        found: list[Loaded] = []

        def latest() -> int | None:
            loaded = self.ckpt.load_latest()
            refusal = resume_refusal(loaded, self.t.max_steps) if loaded else None
            if refusal is not None:
                raise InvalidInputError(refusal)
            if loaded is None:
                return None
            found.append(loaded)
            return loaded.info.step

        step = on_rank0(self.fabric, latest, classify)
        if step is None:
            return 0
        loaded: Loaded | None = None
        failure: Exception | None = None
        try:
            loaded = found[0] if found else self.ckpt.load(step)
        except Exception as err:
            failure = err
        if agree_any(self.fabric, failure is not None):  # every rank loads it, or every rank stops here
            message = f"another rank could not load checkpoint step {step}"
            raise on_all_ranks(failure or PeerError(message, ExitCode.RETRYABLE, "PeerFailed"))
        assert loaded is not None
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

    def _upload_metrics_quietly(self) -> None:
        try:
            self.upload_metrics()
        except Exception as err:
            self.log.warning("metrics_upload_failed", error=str(err))

    # ----- the loop ------------------------------------------------------------------------------------------
    def _agree(self, loss: torch.Tensor | float, *flags: bool) -> tuple[float, list[bool]]:
        """Average the loss and OR the flags over ranks (one all-reduce, which reads the loss too)."""
        if self.world == 1:
            return float(loss), list(flags)
        device = self.fabric.device
        values = torch.tensor([0.0, *[1.0 if f else 0.0 for f in flags]], dtype=torch.float64, device=device)
        values[0] = loss.detach().to(torch.float64) if isinstance(loss, torch.Tensor) else loss
        dist.all_reduce(values)
        out = values.tolist()
        return out[0] / self.world, [v > 0 for v in out[1:]]

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
        """One optimizer step (all micro-batches) starting at `step`; returns (mean loss, data-wait seconds). Reading
        the loss waits for the step's device work (the GPU benchmark relies on it); `run` reads it less often."""
        loss, data_wait = self._step(step)
        return float(loss), data_wait

    def _step(self, step: int) -> tuple[torch.Tensor, float]:
        """`train_step` with the mean loss left on the device (a float64 scalar): no host sync."""
        fabric = self.fabric
        accum = self.t.gradient_accumulation
        data_wait = 0.0
        total: torch.Tensor | None = None
        for micro in range(accum):
            rng.seed_step(self.t.seed, micro * self.world + self.rank, step)
            t0 = time.monotonic()
            batch = self._fetch()
            data_wait += time.monotonic() - t0
            with fabric.no_backward_sync(self.model, enabled=micro < accum - 1):
                loss = self.model.compute_loss(batch)
                fabric.backward(loss / accum)
            part = loss.detach().to(torch.float64) / accum
            total = part if total is None else total + part
        assert total is not None
        if self.t.max_grad_norm is not None:
            clip_gradients(self.fabric, self.model, self.optimizer, self._scaler(), self.t.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, data_wait

    def _tick(self, step: int, lr: float, data_wait: float) -> None:
        """Progress of every step on every rank (rate, ETA, lr); its loss follows when it is read (`_read`)."""
        if self.progress:
            t = self.t
            self.progress.on_step(step, None, lr, t.batch_size * t.gradient_accumulation, data_wait)

    def _read_due(self, pending: int) -> bool:
        """Whether to read the pending losses now: the `step` event is due, or as many steps wait as the divergence
        limit (so a diverged run never trains on for long unseen)."""
        limit = self.t.max_non_finite_loss_steps or MAX_PENDING
        return pending >= min(limit, MAX_PENDING) or time.monotonic() - self._last_log >= self._log_every

    def _read(self, pending: list[tuple[int, torch.Tensor | float, float]], force_log: bool) -> list[tuple[int, float]]:
        """Read the pending steps' losses (one host sync for all of them) and record them: the loss in progress on
        every rank; on rank 0 the metrics.jsonl lines and the (rate-limited) `step` event of the last one."""
        tensors = [v for _, v, _ in pending if isinstance(v, torch.Tensor)]
        read = iter(torch.stack(tensors).tolist() if tensors else [])
        losses = [(step, float(v) if not isinstance(v, torch.Tensor) else next(read)) for step, v, _ in pending]
        if self.progress and losses:
            self.progress.on_loss(losses[-1][1])
        if not self.is_main or not losses:
            return losses
        for (step, loss), (_, _, lr) in zip(losses, pending, strict=True):
            self.metrics.append(step, loss, lr)
        now = time.monotonic()
        if force_log or now - self._last_log >= self._log_every:
            self._last_log = now
            step, loss = losses[-1]
            doc = self.progress.state.document if self.progress else None
            self.log.info(
                "step",
                step=step,
                totalSteps=self.t.max_steps,
                loss=loss,
                lr=pending[-1][2],
                stepsPerSecond=doc.steps_per_second if doc else None,
                etaSeconds=doc.eta_seconds if doc else None,
            )
        return losses

    def run(self) -> LoopOutcome:
        t = self.t
        run = RunState(self.resume(), CheckpointDue(t.checkpoint.interval_steps, t.checkpoint.interval_seconds))
        run.divergence = Divergence(t.max_non_finite_loss_steps)
        if self.progress:
            self.progress.set_phase(TrainerPhase.TRAINING)
        if self.is_main:
            self.log.info("training_started", step=run.start_step, totalSteps=t.max_steps, worldSize=self.world)
        self._log_every = log_interval_seconds()
        self._last_log = 0.0
        self.model.train()
        step = run.start_step
        if step == 0 and self.on_step_end is not None:
            self.on_step_end(0)  # the hook decides whether a fresh run wants anything at step 0
        _, (stop_now,) = self._agree(0.0, self.preemption.requested)
        if stop_now:  # stopped during setup: nothing new to save
            return self._preempted(step, run)
        while step < t.max_steps:
            step_loss, data_wait = self._step(step)
            step += 1
            if self.on_step_end is not None:
                self.on_step_end(step)
            stop, checkpoint_due = self._after_step(step, step_loss, data_wait, run)
            if stop:
                return self._preempted(step, run)
            if checkpoint_due:
                self._checkpoint_unless_diverging(step, run)
        self.log.info("training_finished", step=step, trainableDigest=self.trainable_digest())
        # A final checkpoint lets a retry after a failed export skip training.
        if run.resumed_from != step:
            info = self.checkpoint_sync(step, None)
            self.last_checkpoint = info or self.last_checkpoint
        self.upload_metrics()
        return LoopOutcome("completed", step, run.loss, self.last_checkpoint, run.resumed_from, run.losses)

    def _after_step(self, step: int, step_loss: torch.Tensor, data_wait: float, run: RunState) -> tuple[bool, bool]:
        """Agree with the other ranks on stopping and on a time-due checkpoint, record the step, read the pending
        losses when due (raising LossDivergedError on every rank alike); returns (stop, checkpoint due)."""
        lr = float(self.optimizer.param_groups[0]["lr"])
        if self.world > 1:
            agreed, (stop, time_due) = self._agree(step_loss, self.preemption.requested, run.due.by_time())
            run.pending.append((step, agreed, lr))
        else:
            stop, time_due = self.preemption.requested, run.due.by_time()
            run.pending.append((step, step_loss, lr))
        self._tick(step, lr, data_wait)
        checkpoint_due = step < self.t.max_steps and (run.due.by_steps(step) or time_due)
        force_log = stop or step in (run.start_step + 1, self.t.max_steps)
        # Several ranks read every step (the all-reduce did already), so they all see a divergence at one step.
        if self.world > 1 or force_log or checkpoint_due or self._read_due(len(run.pending)):
            read = self._read(run.pending, force_log)
            run.pending.clear()
            run.losses.extend(read)
            run.loss = read[-1][1]
            try:
                for at, value in read:
                    run.divergence.observe(at, value)
            except LossDivergedError:
                self._upload_metrics_quietly()  # the loss curve up to the divergence, for whoever looks into it
                raise
        return stop, checkpoint_due

    def _checkpoint_unless_diverging(self, step: int, run: RunState) -> None:
        if run.divergence.streak:  # the newest checkpoint stays the last one with finite weights
            if self.is_main:
                self.log.warning("checkpoint_skipped", step=step, reason="the loss is not finite")
            return
        self._checkpoint_async(step)
        run.due.reset()

    def _preempted(self, step: int, run: RunState) -> LoopOutcome:
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
        if step != run.start_step and not run.divergence.streak:  # nothing new, or no finite weights to save
            info = self.checkpoint_sync(step, deadline)
        if info is not None:
            self.last_checkpoint = info
            self._upload_metrics_quietly()
        if self.progress:
            self.progress.set_phase(TrainerPhase.PREEMPTED)
        return LoopOutcome("preempted", step, run.loss, self.last_checkpoint, run.resumed_from, run.losses)

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

"""The training loop's bookkeeping between steps: its outcome, when a checkpoint is due, the losses still on the
device, and divergence (a run whose loss stays NaN or infinite stops for good)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from dreambooth_api import env
from dreambooth_api.exitcodes import LossDivergedError
from dreambooth_trainer.checkpoint import CheckpointInfo
from dreambooth_trainer.distributed import on_all_ranks

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


MAX_PENDING = 50
"""At most this many steps' losses wait on the device before they are read."""


class Divergence:
    """Counts optimizer steps in a row whose loss is NaN or infinite; at `limit` of them the run has diverged."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.streak = 0
        self.first: int | None = None

    def observe(self, step: int, loss: float) -> None:
        """Raises LossDivergedError (marked as raised on every rank: all ranks see the same averaged loss)."""
        if math.isfinite(loss):
            self.streak, self.first = 0, None
            return
        if not self.streak:
            self.first = step
        self.streak += 1
        if self.limit is not None and self.streak >= self.limit:
            raise on_all_ranks(
                LossDivergedError(
                    f"training diverged: the loss was not finite (NaN or infinite) for {self.streak} steps in a row "
                    f"(steps {self.first} to {step}); lower training.learningRate or set training.maxGradNorm. No "
                    "checkpoint was written since the loss stopped being finite, so a run with the same output "
                    "resumes from the last one before it"
                )
            )


@dataclass
class RunState:
    """One `TrainLoop.run`'s state between steps."""

    start_step: int
    due: CheckpointDue
    divergence: Divergence = field(default_factory=lambda: Divergence(None))
    loss: float | None = None
    """The last loss read."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    pending: list[tuple[int, torch.Tensor | float, float]] = field(default_factory=list)
    """(step, loss, lr) of steps whose loss is still on the device (one process reads them when a log line or a
    checkpoint is due; several read every step's in the all-reduce that agrees on stopping)."""

    @property
    def resumed_from(self) -> int | None:
        return self.start_step or None


class CheckpointDue:
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

"""A diverged run stops (issue 17, item 2): once the loss was NaN or infinite for `training.maxNonFiniteLossSteps`
optimizer steps in a row, the loop raises LossDivergedError (exit code 10, reason LossDiverged: a permanent
failure) instead of burning GPU time; while the loss is not finite no checkpoint is written, so the newest one keeps
finite weights. Shorter non-finite streaks and `null` never stop a run. The loop reads the device losses in batches
(when a log line or a checkpoint is due), not with a host sync every step.

On the tiny model a learning rate of 1 without gradient clipping makes the loss NaN within a few steps; the small
stand-in module of test_runtime_loop.py gets its NaNs injected at chosen steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dreambooth_api.config import TrainingConfig
from dreambooth_api.exitcodes import ExitCode, LossDivergedError
from dreambooth_trainer.cli import classify
from dreambooth_trainer.distributed import raised_on_all_ranks
from dreambooth_trainer.loop import TrainLoop
from dreambooth_trainer.loop_state import Divergence
from dreambooth_trainer.preemption import Preemption
from tests.gpu.conftest import job_config, load_tiny, make_loop
from tests.unit.trainer.test_runtime_loop import _config, _events, _loop


def _nan_at(loop: TrainLoop, steps: set[int], *, poison: bool = True) -> list[int]:
    """Make the loss NaN at the given (0-based) optimizer steps; returns the steps the loop trained. `poison=False`:
    only its value (the gradients stay finite, so the weights do too)."""
    trained: list[int] = []
    module = loop.model
    compute = module.compute_loss

    def compute_loss(batch: Any) -> torch.Tensor:
        loss: torch.Tensor = compute(batch)
        if len(trained) not in steps:
            return loss
        return loss * float("nan") if poison else loss + torch.full_like(loss, float("nan")).detach()

    real_step = loop._step

    def step(step: int) -> tuple[torch.Tensor, float]:
        out = real_step(step)
        trained.append(step)
        return out

    module.compute_loss = compute_loss
    loop._step = step  # type: ignore[method-assign]
    return trained


def _checkpoint_steps(root: Path) -> list[int]:
    folder = root / "out" / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / "manifest.json").exists())


def test_the_default_limit_and_null() -> None:
    assert TrainingConfig().max_non_finite_loss_steps == 20
    assert TrainingConfig.model_validate({"maxNonFiniteLossSteps": None}).max_non_finite_loss_steps is None
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        TrainingConfig.model_validate({"maxNonFiniteLossSteps": 0})


def test_divergence_counts_steps_in_a_row() -> None:
    d = Divergence(3)
    for step, loss in [(1, math.nan), (2, math.inf), (3, 0.5), (4, math.nan), (5, -math.inf)]:
        d.observe(step, loss)
    assert (d.streak, d.first) == (2, 4)
    with pytest.raises(LossDivergedError, match=r"3 steps in a row \(steps 4 to 6\)") as caught:
        d.observe(6, math.nan)
    assert raised_on_all_ranks(caught.value)  # every rank sees the same averaged loss and raises at this step
    assert classify(caught.value) == (ExitCode.INVALID_INPUT, "LossDiverged")
    never = Divergence(None)
    for step in range(1, 100):
        never.observe(step, math.nan)
    assert never.streak == 99


def test_a_learning_rate_that_diverges_stops_the_tiny_model(tmp_path: Path) -> None:
    config = job_config(
        tmp_path,
        "full",
        learningRate=1.0,
        maxGradNorm=None,
        warmupSteps=0,
        maxSteps=40,
        maxNonFiniteLossSteps=3,
        checkpoint={"intervalSteps": 1, "intervalSeconds": None, "keep": 50},
    )
    loop = make_loop(config, load_tiny(), tmp_path / "scratch")
    try:
        with pytest.raises(LossDivergedError) as caught:
            loop.run()
    finally:
        loop.close()
    err = caught.value
    assert (err.exit_code, err.reason) == (ExitCode.INVALID_INPUT, "LossDiverged")
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = {line["step"]: line["loss"] for line in lines}
    first_bad = min(step for step, loss in losses.items() if not math.isfinite(loss))
    assert first_bad > 1  # it diverged while training, not from the start
    # It stopped at the third non-finite step in a row (the default limit would have let it run 20).
    assert max(losses) == first_bad + 2 < 40
    assert f"(steps {first_bad} to {first_bad + 2})" in str(err)
    # A checkpoint every step, but none once the loss stopped being finite: the newest keeps finite weights.
    assert _checkpoint_steps(tmp_path) == list(range(1, first_bad))


def test_a_short_non_finite_streak_does_not_stop_a_run_and_skips_its_checkpoint(tmp_path: Path) -> None:
    config = _config(tmp_path, maxSteps=12, maxNonFiniteLossSteps=3)
    loop, buf = _loop(config, Preemption())
    trained = _nan_at(loop, {6, 7}, poison=False)  # steps 7 and 8 (1-based): the checkpoint due at 8 is skipped
    out = loop.run()
    loop.close()
    assert out.status == "completed"
    assert trained == list(range(12))
    assert [s for s, loss in out.losses if not math.isfinite(loss)] == [7, 8]
    skipped = [e["step"] for e in _events(buf) if e["event"] == "checkpoint_skipped"]
    assert skipped == [8]
    assert _checkpoint_steps(tmp_path) == [4, 12]  # keep 2: step 8 was never written


def test_null_never_stops(tmp_path: Path) -> None:
    config = _config(tmp_path, maxSteps=12, maxNonFiniteLossSteps=None)
    loop, _ = _loop(config, Preemption())
    _nan_at(loop, set(range(2, 12)))
    out = loop.run()
    loop.close()
    assert out.status == "completed"
    assert len(out.losses) == 12


def test_three_nan_steps_in_a_row_stop_the_loop_before_its_next_step(tmp_path: Path) -> None:
    config = _config(tmp_path, maxSteps=12, maxNonFiniteLossSteps=3)
    loop, _ = _loop(config, Preemption())
    trained = _nan_at(loop, {4, 5, 6})
    with pytest.raises(LossDivergedError, match=r"steps 5 to 7"):
        loop.run()
    loop.close()
    assert trained == list(range(7))  # detected at step 7: the limit bounds how many steps wait unread


def test_losses_are_read_in_batches_not_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One process: the losses stay on the device until a `step` log line, a checkpoint or the end is due, and
    are then read together (one host sync); every step still gets its metrics line and loss."""
    monkeypatch.setenv("DREAMBOOTH_LOG_INTERVAL_SECONDS", "3600")
    config = _config(tmp_path, maxSteps=12, maxNonFiniteLossSteps=None)  # checkpoints at 4 and 8, the end at 12
    loop, buf = _loop(config, Preemption())
    reads: list[list[int]] = []
    real_read = loop._read

    def read(pending: list[Any], force_log: bool) -> list[tuple[int, float]]:
        reads.append([step for step, _, _ in pending])
        return real_read(pending, force_log)

    loop._read = read  # type: ignore[method-assign]
    out = loop.run()
    loop.close()
    assert reads == [[1], [2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]  # the first step is logged at once
    assert [s for s, _ in out.losses] == list(range(1, 13))
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"]) for x in lines] == out.losses
    assert [e["step"] for e in _events(buf) if e["event"] == "step"] == [1, 12]

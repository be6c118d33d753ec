"""The Fabric loop on a small module: exact resume after preemption, cadence, retention, final checkpoint,
which checkpoints a run may resume, and closing without waiting past the preemption deadline.

The module here is a stand-in with the DreamBoothModule's interface (compute_loss, configure_optimizers,
trainable_state_dict, load_trainable_state_dict) and real randomness (noise, dropout), so that the test
fails if any RNG or optimizer state were not restored; the real module runs in tests/integration.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric import Fabric

from dreambooth_api.config import JobConfig
from dreambooth_api.exitcodes import ExitCode, InvalidInputError, RetryableError
from dreambooth_trainer.checkpoint import run_fingerprint
from dreambooth_trainer.logging import EventLog
from dreambooth_trainer.loop import TrainLoop
from dreambooth_trainer.loop_state import CheckpointDue
from dreambooth_trainer.module import build_lr_scheduler
from dreambooth_trainer.preemption import Preemption
from dreambooth_trainer.progress import Progress
from dreambooth_trainer.storage import ObjectStore


class NoisyRegressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.frozen(batch["x"]) + torch.randn_like(batch["x"]) * 0.1
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), batch["y"])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compute_loss(batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("net.")}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(sd, strict=False)


class Points(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(5, 4, generator=g)
        self.y = self.x.sum(-1)
        self.epochs: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epochs.add(epoch)

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def _config(tmp_path: Path, **training: Any) -> JobConfig:
    return JobConfig.model_validate(
        {
            "instanceImages": {"uri": f"file://{tmp_path}/in", "prompt": "a sks dog"},
            "output": {"uri": f"file://{tmp_path}/out"},
            "training": {
                "maxSteps": 12,
                "batchSize": 2,
                "gradientAccumulation": 2,
                "lrSchedule": "cosine",
                "warmupSteps": 3,
                "checkpoint": {"intervalSteps": 4, "intervalSeconds": None, "keep": 2},
                **training,
            },
        }
    )


def _loop(
    config: JobConfig, preemption: Preemption, stop_at: int | None = None, seen: list[int] | None = None
) -> tuple[TrainLoop, io.StringIO]:
    fabric = Fabric(accelerator="cpu", devices=1)
    buf = io.StringIO()

    def hook(step: int) -> None:
        if seen is not None:
            seen.append(step)
        if stop_at is not None and step == stop_at:
            preemption.trigger()

    loop = TrainLoop(
        fabric=fabric,
        config=config,
        module=NoisyRegressor(),
        dataset=Points(),
        collate=torch.utils.data.default_collate,
        store=ObjectStore(),
        progress=Progress("t", "ns", 0, config.training.max_steps),
        preemption=preemption,
        log=EventLog(buf),
        on_step_end=hook,
    )
    return loop, buf


def _events(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def test_preempted_and_resumed_run_matches_an_uninterrupted_one_bitwise(tmp_path: Path) -> None:
    a_loop, _ = _loop(_config(tmp_path / "a"), Preemption(grace=30))
    a = a_loop.run()
    a_loop.close()
    assert a.status == "completed"
    assert a.step == 12

    b_cfg = _config(tmp_path / "b")
    first_steps: list[int] = []
    first, _ = _loop(b_cfg, Preemption(grace=30), stop_at=6, seen=first_steps)
    out1 = first.run()
    first.close()
    assert out1.status == "preempted"
    assert out1.step == 6
    assert out1.last_checkpoint is not None
    assert out1.last_checkpoint.step == 6

    second_steps: list[int] = []
    second, buf = _loop(b_cfg, Preemption(grace=30), seen=second_steps)
    out2 = second.run()
    second.close()
    # The step hook (validation) also runs before the first step of a fresh run, never again after a resume.
    assert first_steps == list(range(7))
    assert second_steps == list(range(7, 13))
    assert out2.resumed_from == 6
    assert out2.step == 12
    resumed = [e for e in _events(buf) if e["event"] == "resumed"]
    assert resumed == [resumed[0]]
    assert resumed[0]["step"] == 6
    assert resumed[0]["uri"].endswith("/out/checkpoints/step-00000006")

    # Bitwise-equal weights and per-step losses.
    wa, wb = a_loop.module.trainable_state_dict(), second.module.trainable_state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert out1.losses + out2.losses == a.losses
    # metrics.jsonl of the interrupted run holds every step once.
    lines = (tmp_path / "b/out/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 13))
    assert [json.loads(x)["loss"] for x in lines] == [loss for _, loss in a.losses]


def test_cadence_retention_and_final_checkpoint(tmp_path: Path) -> None:
    loop, buf = _loop(_config(tmp_path, maxSteps=10), Preemption(grace=30))
    out = loop.run()
    loop.close()
    ck = tmp_path / "out/checkpoints"
    # Steps 4 and 8 periodically, 10 at the end; keep 2.
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000008", "step-00000010"]
    assert out.last_checkpoint is not None
    assert out.last_checkpoint.step == 10
    events = _events(buf)
    written = [e["step"] for e in events if e["event"] == "checkpoint_written"]
    assert written == [4, 8, 10]
    stalls = [e["stallSeconds"] for e in events if e["event"] == "checkpoint_started"]
    assert len(stalls) == 2
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["step"] == 1
    assert steps[-1]["step"] == 10
    assert set(steps[-1]) >= {"step", "totalSteps", "loss", "lr", "stepsPerSecond", "etaSeconds"}
    state = json.loads((ck / "step-00000010/state.json").read_text())
    # 10 steps x 2 micro-batches x batch 2 = 40 positions over 5 items = epoch 8.
    assert state["sampler"] == {"position": 40, "epoch": 8, "index": 0}
    assert loop.dataset.epochs == set(range(8))  # type: ignore[attr-defined]

    # Resuming a finished run trains nothing and writes nothing new.
    again, _ = _loop(_config(tmp_path, maxSteps=10), Preemption(grace=30))
    out2 = again.run()
    again.close()
    assert (out2.resumed_from, out2.step, out2.losses) == (10, 10, [])


@pytest.mark.parametrize("damage", ["manifest", "weights"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path: Path, damage: str) -> None:
    cfg = _config(tmp_path, maxSteps=8)
    loop, _ = _loop(cfg, Preemption(grace=30))
    loop.run()
    loop.close()
    newest = tmp_path / "out/checkpoints/step-00000008"
    if damage == "manifest":
        (newest / "manifest.json").write_text("{not json")
    else:
        (newest / "trainable.safetensors").write_bytes(b"garbage")
    again, buf = _loop(cfg, Preemption(grace=30))
    out = again.run()
    again.close()
    assert out.resumed_from == 4
    events = _events(buf)
    assert [e["step"] for e in events if e["event"] == "checkpoint_skipped"] == [8]


def test_sigterm_before_the_first_step_writes_nothing(tmp_path: Path) -> None:
    preemption = Preemption(grace=30)
    preemption.trigger("SIGTERM")
    loop, buf = _loop(_config(tmp_path), preemption)
    out = loop.run()
    loop.close()
    assert (out.status, out.step, out.last_checkpoint) == ("preempted", 0, None)
    assert not (tmp_path / "out/checkpoints").exists()
    assert [e["event"] for e in _events(buf)][-1] == "preempting"


def test_time_cadence_checkpoints_when_the_interval_passed() -> None:
    due = CheckpointDue(None, 10)
    assert not due.by_time()
    assert not due.by_steps(100)
    due.last -= 11
    assert due.by_time()
    due.reset()
    assert not due.by_time()
    both = CheckpointDue(4, None)
    assert both.by_steps(8)
    assert not both.by_steps(9)
    assert not both.by_time()


def test_resume_during_a_storage_outage_is_retryable_and_never_starts_over(tmp_path: Path) -> None:
    cfg = _config(tmp_path, maxSteps=8)
    loop, _ = _loop(cfg, Preemption(grace=30))
    loop.run()
    loop.close()
    again, buf = _loop(cfg, Preemption(grace=30))

    def reset(*_args: object) -> None:
        raise ConnectionError("Connection reset by peer")

    again.ckpt.store.download_file = reset  # type: ignore[method-assign]
    with pytest.raises(RetryableError) as raised:
        again.run()
    again.close()
    assert raised.value.exit_code == ExitCode.RETRYABLE
    events = [e["event"] for e in _events(buf)]
    assert "training_started" not in events
    assert "checkpoint_skipped" not in events
    assert again.ckpt.complete_steps() == [8, 4]


def _strip_fingerprints(root: Path) -> None:
    for manifest in root.glob("step-*/manifest.json"):
        doc = json.loads(manifest.read_text())
        del doc["fingerprint"]
        manifest.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "change",
    [{"seed": 7}, {"method": "full"}, {"lora": {"rank": 16}}, {"resolution": 256}, {"trainTextEncoder": True}],
    ids=["seed", "method", "lora-rank", "resolution", "text-encoder"],
)
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path, change: dict[str, Any]) -> None:
    loop, _ = _loop(_config(tmp_path, maxSteps=8), Preemption(grace=30))
    loop.run()
    loop.close()
    other, buf = _loop(_config(tmp_path, maxSteps=12, **change), Preemption(grace=30))
    with pytest.raises(InvalidInputError) as raised:
        other.run()
    other.close()
    assert raised.value.exit_code == ExitCode.INVALID_INPUT
    message = str(raised.value)
    assert f"file://{tmp_path}/out/checkpoints/step-00000008" in message
    assert "new output.uri" in message
    assert "training_started" not in [e["event"] for e in _events(buf)]


def test_resume_accepts_changed_max_steps_validation_and_cadence(tmp_path: Path) -> None:
    loop, _ = _loop(_config(tmp_path, maxSteps=8), Preemption(grace=30))
    loop.run()
    loop.close()
    changed = {
        "maxSteps": 10,
        "learningRate": 5e-4,
        "validation": {"prompts": ["a sks dog"]},
        "checkpoint": {"intervalSteps": 2, "intervalSeconds": None, "keep": 3},
    }
    cfg = _config(tmp_path, **changed)
    assert run_fingerprint(cfg) == run_fingerprint(_config(tmp_path, maxSteps=8))
    again, _ = _loop(cfg, Preemption(grace=30))
    out = again.run()
    again.close()
    assert (out.resumed_from, out.step) == (8, 10)


def test_checkpoint_without_fingerprint_resumes_only_below_max_steps(tmp_path: Path) -> None:
    loop, _ = _loop(_config(tmp_path, maxSteps=8), Preemption(grace=30))
    loop.run()
    loop.close()
    _strip_fingerprints(tmp_path / "out/checkpoints")
    # At or past maxSteps it would be exported untrained, so it must be shown to be this run's.
    finished, _ = _loop(_config(tmp_path, maxSteps=8), Preemption(grace=30))
    with pytest.raises(InvalidInputError) as raised:
        finished.run()
    finished.close()
    assert "step-00000008" in str(raised.value)
    assert "training.maxSteps 8" in str(raised.value)
    # Below maxSteps an older trainer's checkpoint resumes as before.
    longer, _ = _loop(_config(tmp_path, maxSteps=10), Preemption(grace=30))
    out = longer.run()
    longer.close()
    assert (out.resumed_from, out.step) == (8, 10)


def test_close_after_a_missed_preemption_deadline_does_not_wait_for_the_upload(tmp_path: Path) -> None:
    preemption = Preemption(grace=4)  # the checkpoint deadline is 1 s after the signal
    loop, buf = _loop(_config(tmp_path), preemption, stop_at=6)
    gate = threading.Event()
    original = loop.ckpt.store.upload_file

    def upload(local: Path | str, uri: str) -> None:
        if "/step-00000006/" in uri:
            gate.wait(60)  # an upload that outlives the grace period
        original(local, uri)

    loop.ckpt.store.upload_file = upload  # type: ignore[method-assign]
    out = loop.run()
    assert (out.status, out.step) == ("preempted", 6)
    assert out.last_checkpoint is not None
    assert out.last_checkpoint.step == 4
    closed: list[bool] = []
    closer = threading.Thread(target=lambda: closed.append(loop.close()))
    closer.start()
    closer.join(timeout=15)
    stuck = closer.is_alive()
    gate.set()
    closer.join()
    assert not stuck, "close() waited for the upload past the preemption deadline"
    assert closed == [True]
    abandoned = [e for e in _events(buf) if e["event"] == "checkpoint_incomplete" and e["reason"] == "abandoned"]
    assert [e["step"] for e in abandoned] == [6]


def test_the_default_scheduler_warms_up_a_constant_schedule(tmp_path: Path) -> None:
    """`warmupSteps` with `lrSchedule: constant` warms up (it was silently dropped)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, _config(tmp_path, lrSchedule="constant", warmupSteps=4).training)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]

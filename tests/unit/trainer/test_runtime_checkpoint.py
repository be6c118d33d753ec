"""Checkpoint folders on file:// storage: round trip, manifest-last atomicity, skipping corrupt ones, pruning,
keeping checkpoints through storage errors, run fingerprints, and not waiting for an abandoned upload."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dreambooth_api.exitcodes import ExitCode, InvalidInputError, RetryableError
from dreambooth_trainer.checkpoint import (
    MANIFEST,
    OPTIMIZER,
    TRAINABLE,
    AsyncCheckpointer,
    CheckpointCancelledError,
    CheckpointMismatchError,
    CheckpointStore,
    CheckpointUnavailableError,
    RunFingerprint,
    Snapshot,
    to_cpu,
)
from dreambooth_trainer.logging import EventLog
from dreambooth_trainer.storage import ObjectStore, StorageError


def _snapshot(step: int) -> Snapshot:
    model = torch.nn.Linear(4, 3)
    torch.nn.init.constant_(model.weight, float(step))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    sched.step()
    return Snapshot(
        step=step,
        trainable=to_cpu(model.state_dict()),
        optimizer=to_cpu(opt.state_dict()),
        scheduler=sched.state_dict(),
        state={"sampler": {"position": step * 2, "epoch": 0, "index": 0}},
        config={"name": "t"},
    )


Ckpts = tuple[CheckpointStore, list[dict[str, object]]]


@pytest.fixture
def ckpts(tmp_path: Path) -> Ckpts:
    lines: list[dict[str, object]] = []

    class Sink:
        def write(self, s: str) -> None:
            lines.extend(json.loads(x) for x in s.splitlines() if x)

        def flush(self) -> None:
            pass

    log = EventLog(Sink())  # type: ignore[arg-type]
    return CheckpointStore(ObjectStore(), f"file://{tmp_path}/ck", keep=2, log=log), lines


def test_round_trip_restores_weights_optimizer_and_state(
    ckpts: Ckpts,
) -> None:
    store, _ = ckpts
    snap = _snapshot(3)
    info = store.write(snap)
    assert info.uri.endswith("/ck/step-00000003")
    assert info.bytes > 0
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.info.step == 3
    for k, v in snap.trainable.items():
        assert torch.equal(loaded.trainable[k], v)
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], snap.optimizer["state"][0]["exp_avg"])
    assert loaded.scheduler is not None
    assert loaded.scheduler["last_epoch"] == 1
    assert loaded.state["sampler"]["position"] == 6
    assert loaded.config == {"name": "t"}


def test_folder_without_manifest_is_never_used(ckpts: Ckpts) -> None:
    store, _ = ckpts
    store.write(_snapshot(1))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CheckpointCancelledError):
        store.write(_snapshot(2), cancel)
    # A partial folder with every file but the manifest.
    partial = Path(store.uri_for(5).removeprefix("file://"))
    partial.mkdir(parents=True)
    (partial / TRAINABLE).write_bytes(b"x")
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.info.step == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_newest_is_skipped_with_a_warning(ckpts: Ckpts, damage: str) -> None:
    store, lines = ckpts
    store.write(_snapshot(1))
    store.write(_snapshot(2))
    target = Path(store.uri_for(2).removeprefix("file://")) / OPTIMIZER
    data = target.read_bytes()
    if damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "truncate":
        target.write_bytes(data[:-10])
    else:
        target.unlink()
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.info.step == 1
    skipped = [x for x in lines if x["event"] == "checkpoint_skipped"]
    assert len(skipped) == 1
    assert skipped[0]["step"] == 2
    assert skipped[0]["level"] == "warning"


def test_keep_newest_k_and_drop_older_partials(ckpts: Ckpts) -> None:
    store, _ = ckpts
    root = Path(store.root_uri.removeprefix("file://"))
    (root / "step-00000000").mkdir(parents=True)
    (root / "step-00000000" / TRAINABLE).write_bytes(b"partial")
    for step in (1, 2, 3):
        store.write(_snapshot(step))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
    assert store.complete_steps() == [3, 2]
    # A newer partial folder (an upload cut short) is not deleted: it may be in flight.
    (root / "step-00000004").mkdir()
    (root / "step-00000004" / TRAINABLE).write_bytes(b"partial")
    store.prune()
    assert (root / "step-00000004").exists()


def test_async_checkpointer_one_in_flight_and_callbacks(ckpts: Ckpts) -> None:
    store, _ = ckpts
    done: list[int] = []
    writer = AsyncCheckpointer(store, on_complete=lambda info: done.append(info.step))
    writer.submit(_snapshot(1))
    writer.submit(_snapshot(2))  # waits for step 1 first
    assert writer.wait(timeout=30)
    assert done == [1, 2]
    assert writer.stats.written == 2
    assert writer.stats.last is not None
    assert writer.stats.last.step == 2
    writer.close()


def test_write_sync_past_the_deadline_leaves_the_previous_checkpoint(
    ckpts: Ckpts,
) -> None:
    store, _ = ckpts
    store.write(_snapshot(1))
    gate = _hold_uploads(store)
    writer = AsyncCheckpointer(store)
    assert writer.write_sync(_snapshot(2), deadline=time.monotonic() + 0.2) is None
    gate.set()
    assert writer.wait(timeout=30)
    assert store.complete_steps() == [1]
    assert not (Path(store.uri_for(2).removeprefix("file://")) / MANIFEST).exists()
    # Cancelling that write did not cancel the writer: the next checkpoint completes.
    info = writer.write_sync(_snapshot(3), deadline=time.monotonic() + 30)
    assert info is not None
    assert info.step == 3
    writer.close()
    assert sorted(store.complete_steps()) == [1, 3]


def _hold_uploads(store: CheckpointStore) -> threading.Event:
    """Make every upload of `store` wait until the returned event is set (at most 30 s)."""
    gate = threading.Event()
    original = store.store.upload_file

    def held_upload(local: Path | str, uri: str) -> None:
        gate.wait(30)
        original(local, uri)

    store.store.upload_file = held_upload  # type: ignore[method-assign]
    return gate


def _failing(err: BaseException) -> Any:
    def fail(*_args: object) -> None:
        raise err

    return fail


@pytest.mark.parametrize(
    ("method", "err"),
    [
        ("download_file", ConnectionError("Connection reset by peer")),
        ("download_file", TimeoutError("read timed out")),
        ("download_file", StorageError("object storage failed: 503 SlowDown")),
        ("read_bytes", StorageError("object storage failed: 503 SlowDown")),
        ("read_bytes", OSError(5, "Input/output error")),
    ],
    ids=["reset", "timeout", "503", "manifest-503", "manifest-eio"],
)
def test_transient_read_error_keeps_the_checkpoint_and_is_retryable(
    ckpts: Ckpts, method: str, err: BaseException
) -> None:
    store, lines = ckpts
    store.write(_snapshot(1))
    store.write(_snapshot(2))
    original = getattr(store.store, method)
    setattr(store.store, method, _failing(err))
    with pytest.raises(CheckpointUnavailableError) as raised:
        store.load_latest()
    assert isinstance(raised.value, RetryableError)
    assert raised.value.exit_code == ExitCode.RETRYABLE
    assert store.uri_for(2) in str(raised.value)
    assert not [x for x in lines if x["event"] == "checkpoint_skipped"]
    # Nothing was given up: once storage is back, the newest checkpoint loads.
    setattr(store.store, method, original)
    assert store.complete_steps() == [2, 1]
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.info.step == 2


def _fingerprint(**fields: Any) -> RunFingerprint:
    return RunFingerprint({"method": "lora", "seed": 42, "resolution": 512, **fields})


def test_checkpoint_of_another_run_is_invalid_input(tmp_path: Path) -> None:
    root = f"file://{tmp_path}/ck"
    mine = CheckpointStore(ObjectStore(), root, fingerprint=_fingerprint())
    mine.write(_snapshot(1))
    manifest = json.loads((Path(mine.uri_for(1).removeprefix("file://")) / MANIFEST).read_text())
    assert manifest["fingerprint"] == {"sha256": _fingerprint().sha256, "fields": dict(_fingerprint().fields)}
    loaded = CheckpointStore(ObjectStore(), root, fingerprint=_fingerprint()).load_latest()
    assert loaded is not None
    assert loaded.fingerprint == _fingerprint().sha256

    other = CheckpointStore(ObjectStore(), root, fingerprint=_fingerprint(seed=7, resolution=256))
    with pytest.raises(CheckpointMismatchError) as raised:
        other.load_latest()
    assert isinstance(raised.value, InvalidInputError)
    assert raised.value.exit_code == ExitCode.INVALID_INPUT
    message = str(raised.value)
    assert mine.uri_for(1) in message
    assert "resolution, seed" in message
    assert "new output.uri" in message
    assert "delete the checkpoints" in message


def test_checkpoint_without_fingerprint_is_accepted(tmp_path: Path) -> None:
    root = f"file://{tmp_path}/ck"
    CheckpointStore(ObjectStore(), root).write(_snapshot(3))  # an older trainer: no fingerprint in the manifest
    loaded = CheckpointStore(ObjectStore(), root, fingerprint=_fingerprint()).load_latest()
    assert loaded is not None
    assert (loaded.info.step, loaded.fingerprint) == (3, None)


def test_close_with_a_deadline_leaves_a_stuck_upload_behind(ckpts: Ckpts) -> None:
    store, _ = ckpts
    store.write(_snapshot(1))
    gate = _hold_uploads(store)
    writer = AsyncCheckpointer(store)
    writer.submit(_snapshot(2))
    try:
        assert writer.close(deadline=time.monotonic() + 0.2) == 2
        assert writer.busy
        # The interpreter does not join the upload at exit.
        uploads = [t for t in threading.enumerate() if t.name == "checkpoint-upload"]
        assert uploads
        assert all(t.daemon for t in uploads)
    finally:
        gate.set()
    assert writer.wait(timeout=30)
    # It was cancelled before its manifest: the previous checkpoint stays the valid one.
    assert store.complete_steps() == [1]
    assert writer.close() is None

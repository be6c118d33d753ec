"""Step checkpoints in object storage: atomic by a manifest written last, verified on load, pruned to K.

A checkpoint is the folder `<checkpoint uri>/step-XXXXXXXX/` holding

| file | what |
|---|---|
| `trainable.safetensors` | the trainable weights (`DreamBoothModule.trainable_state_dict()`) |
| `ema.safetensors` | EMA weights, when EMA is on |
| `optimizer.pt` | optimizer, LR scheduler and grad-scaler state dicts (`torch.load(weights_only=True)` reads it) |
| `state.json` | global step, sampler position (epoch, index), RNG states, world size, elapsed seconds |
| `config.json` | the resolved JobConfig |
| `manifest.json` | written last: each file's size and sha256, and the run fingerprint; it makes the folder complete |

Writing happens from a CPU snapshot (`Snapshot`), so the training loop is blocked only while tensors are
copied; `AsyncCheckpointer` serializes and uploads in one background thread, at most one in flight.

Reading tells three failures apart: a corrupt checkpoint (size or sha256 mismatch, an object the manifest lists
is missing, undecodable data, wrong step or name) is skipped for an older one; a storage or transport failure
raises `CheckpointUnavailableError` (retryable, the checkpoint is kept); a checkpoint of another run (its
fingerprint differs) raises `CheckpointMismatchError` (invalid input).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dreambooth_api.exitcodes import InvalidInputError, RetryableError
from dreambooth_trainer.logging import EventLog, utc_now_iso
from dreambooth_trainer.logging import log as default_log
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore, StorageError, join_uri

MANIFEST = "manifest.json"
TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
CONFIG = "config.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointCorruptError(Exception):
    """A checkpoint folder is incomplete or does not match its manifest."""


class CheckpointCancelledError(Exception):
    """The write was cancelled before its manifest was written (the folder stays incomplete)."""


class CheckpointUnavailableError(StorageError):
    """A checkpoint could not be read for a transient reason (storage outage, network error): it is kept, and
    the process exits retryable instead of skipping it."""

    reason = "StorageUnavailable"


class CheckpointMismatchError(InvalidInputError):
    """The checkpoint was written by a run with other training-relevant settings (its fingerprint differs)."""

    foreign_output = True
    """The output belongs to that other run: the CLI writes no result.json over it."""


@dataclass(frozen=True)
class RunFingerprint:
    """The settings that give a run's trainable state its shape and meaning; only a checkpoint written with the
    same ones is resumed. Checkpoints without a fingerprint (older trainers) are accepted."""

    fields: Mapping[str, Any]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_wire(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "fields": dict(self.fields)}


def fingerprint_mismatch(stored: Any, expected: RunFingerprint) -> list[str] | None:
    """None when a manifest's `fingerprint` matches `expected`; else the names of the fields that differ (all of
    `expected`'s when the stored fields are unknown). Raises ValueError when `stored` is malformed."""
    if not isinstance(stored, dict) or not isinstance(stored.get("sha256"), str):
        raise ValueError(f"malformed fingerprint: {stored!r}")
    if stored["sha256"] == expected.sha256:
        return None
    fields = stored.get("fields")
    if not isinstance(fields, dict):
        return sorted(expected.fields)
    return sorted(k for k in set(fields) | set(expected.fields) if fields.get(k) != expected.fields.get(k))


def is_transient(err: BaseException) -> bool:
    """A storage or transport failure that a retry may fix; a missing object is not one."""
    return isinstance(err, RetryableError | OSError) and not isinstance(err, ObjectNotFoundError)


def to_cpu(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor detached, cloned and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True).contiguous()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


class StagingBuffers:
    """Reusable pinned CPU buffers for snapshots of CUDA tensors.

    `to_cpu` allocates pageable memory and copies each tensor synchronously: for a full SD 1.5 UNet with AdamW
    state (10 GB) that blocked training for 7.7 s per checkpoint on an H200 (bench/results/checkpoint.json).
    Here every CUDA tensor is copied with `non_blocking=True` into a pinned buffer kept from the previous
    snapshot, and one synchronize waits for all copies. The buffers are overwritten by the next snapshot, so it
    may only be taken after the previous one was written (`AsyncCheckpointer.wait()`). CPU tensors are cloned.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _copy(self, obj: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if not t.is_cuda:
                return t.to("cpu", copy=True).contiguous()
            buf = self._buffers.get(path)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self._buffers[path] = buf
            buf.copy_(t, non_blocking=True)
            return buf
        if isinstance(obj, dict):
            return {k: self._copy(v, (*path, k)) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            items = [self._copy(v, (*path, i)) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return obj

    def snapshot(self, obj: Any, name: str) -> Any:
        """Like `to_cpu(obj)`; `name` keeps different state dicts in different buffers."""
        out = self._copy(obj, (name,))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out


@dataclass
class Snapshot:
    """Everything a checkpoint holds, already on the CPU and detached from the training state."""

    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    ema: dict[str, torch.Tensor] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    """JSON-compatible: sampler position, RNG states, world size, elapsed seconds."""
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    uri: str
    time: str
    bytes: int = 0
    upload_seconds: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"step": self.step, "uri": self.uri, "time": self.time}


@dataclass
class Loaded:
    """A verified checkpoint read back from storage."""

    info: CheckpointInfo
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any] | None
    ema: dict[str, torch.Tensor] | None
    state: dict[str, Any]
    config: dict[str, Any]
    fingerprint: str | None = None
    """The sha256 of the run fingerprint in the manifest; None for checkpoints of older trainers."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(4 * 1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def write_files(snapshot: Snapshot, folder: Path) -> dict[str, Path]:
    """Serialize a snapshot into local files (everything but the manifest)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    save_file(snapshot.trainable, str(folder / TRAINABLE))
    files[TRAINABLE] = folder / TRAINABLE
    if snapshot.ema is not None:
        save_file(snapshot.ema, str(folder / EMA))
        files[EMA] = folder / EMA
    torch.save(
        {"optimizer": snapshot.optimizer, "scheduler": snapshot.scheduler, "scaler": snapshot.scaler},
        folder / OPTIMIZER,
    )
    files[OPTIMIZER] = folder / OPTIMIZER
    state = {"formatVersion": FORMAT_VERSION, "step": snapshot.step, **snapshot.state}
    (folder / STATE).write_text(json.dumps(state, separators=(",", ":")))
    files[STATE] = folder / STATE
    (folder / CONFIG).write_text(json.dumps(snapshot.config, indent=2, sort_keys=True))
    files[CONFIG] = folder / CONFIG
    return files


def build_manifest(step: int, files: Mapping[str, Path], fingerprint: RunFingerprint | None = None) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "formatVersion": FORMAT_VERSION,
        "step": step,
        "createdAt": utc_now_iso(),
        "files": {
            name: {"size": path.stat().st_size, "sha256": _sha256_file(path)} for name, path in sorted(files.items())
        },
    }
    if fingerprint is not None:
        manifest["fingerprint"] = fingerprint.to_wire()
    return manifest


class CheckpointStore:
    """Reads, writes and prunes the checkpoints under one URI prefix."""

    def __init__(
        self,
        store: ObjectStore,
        root_uri: str,
        *,
        keep: int = 2,
        scratch: Path | None = None,
        log: EventLog | None = None,
        fingerprint: RunFingerprint | None = None,
    ) -> None:
        self.store = store
        self.root_uri = root_uri.rstrip("/")
        self.keep = keep
        self.scratch = scratch
        self.log = log or default_log
        self.fingerprint = fingerprint

    def uri_for(self, step: int) -> str:
        return join_uri(self.root_uri, step_dir_name(step))

    # ----- discovery -----------------------------------------------------------------------------------
    def folders(self) -> dict[int, set[str]]:
        """step -> names of the files found in its folder (complete or not)."""
        out: dict[int, set[str]] = {}
        base = self.root_uri + "/"
        for obj in self.store.list(self.root_uri):
            rel = obj.uri[len(base) :] if obj.uri.startswith(base) else ""
            top, _, name = rel.partition("/")
            m = _STEP_DIR.match(top)
            if m and name:
                out.setdefault(int(m.group(1)), set()).add(name)
        return out

    def complete_steps(self) -> list[int]:
        """Steps whose folder has a manifest (not yet verified), newest first."""
        return sorted((s for s, names in self.folders().items() if MANIFEST in names), reverse=True)

    # ----- writing -------------------------------------------------------------------------------------
    def write(self, snapshot: Snapshot, cancel: threading.Event | None = None) -> CheckpointInfo:
        """Serialize, upload every file, then the manifest, then prune. Raises on failure or cancel."""
        start = time.monotonic()
        uri = self.uri_for(snapshot.step)
        # Rewriting a step (its earlier write did not verify): invalidate the old manifest first.
        self.store.delete(join_uri(uri, MANIFEST))
        tmp = Path(tempfile.mkdtemp(prefix=f"ckpt-{snapshot.step}-", dir=self.scratch))
        try:
            files = write_files(snapshot, tmp)
            manifest = build_manifest(snapshot.step, files, self.fingerprint)
            for name, path in files.items():
                if cancel is not None and cancel.is_set():
                    raise CheckpointCancelledError(uri)
                self.store.upload_file(path, join_uri(uri, name))
            if cancel is not None and cancel.is_set():
                raise CheckpointCancelledError(uri)
            self.store.write_bytes(join_uri(uri, MANIFEST), json.dumps(manifest, indent=2).encode())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        size = sum(int(f["size"]) for f in manifest["files"].values())
        info = CheckpointInfo(snapshot.step, uri, manifest["createdAt"], size, time.monotonic() - start)
        try:
            self.prune()
        except Exception as err:  # the new checkpoint is complete; old ones are deleted next time
            self.log.warning("checkpoint_prune_failed", step=snapshot.step, error=str(err))
        return info

    def prune(self) -> list[int]:
        """Delete all but the newest `keep` complete checkpoints, and incomplete folders older than the newest
        complete one. A manifest is deleted first, so a half-deleted folder never looks complete."""
        folders = self.folders()
        complete = sorted((s for s, n in folders.items() if MANIFEST in n), reverse=True)
        if not complete:
            return []
        newest = complete[0]
        doomed = complete[self.keep :] + [s for s, n in folders.items() if MANIFEST not in n and s < newest]
        for step in sorted(doomed):
            uri = self.uri_for(step)
            self.store.delete(join_uri(uri, MANIFEST))
            self.store.delete_prefix(uri)
            self.log.info("checkpoint_deleted", step=step, uri=uri)
        return sorted(doomed)

    # ----- reading -------------------------------------------------------------------------------------
    def _read(self, uri: str, name: str, read: Callable[[], Any]) -> Any:
        """Run one storage read of checkpoint `uri`: a missing object means corrupt, a transport failure means
        unavailable; anything else propagates as it is."""
        try:
            return read()
        except ObjectNotFoundError as err:
            raise CheckpointCorruptError(f"{uri}: {name} is missing") from err
        except Exception as err:
            if is_transient(err):
                raise CheckpointUnavailableError(f"{uri}/{name} could not be read (checkpoint kept): {err}") from err
            raise

    def _check_fingerprint(self, uri: str, manifest: dict[str, Any]) -> None:
        if self.fingerprint is None or manifest.get("fingerprint") is None:
            return
        try:
            differ = fingerprint_mismatch(manifest["fingerprint"], self.fingerprint)
        except ValueError as err:
            raise CheckpointCorruptError(f"{uri}: {err}") from err
        if differ is not None:
            raise CheckpointMismatchError(
                f"checkpoint {uri} was written by a run with other settings ({', '.join(differ)}); "
                f"use a new output.uri (or output.checkpointUri), or delete the checkpoints under {self.root_uri}"
            )

    def _manifest(self, uri: str, step: int) -> dict[str, Any]:
        data = self._read(uri, MANIFEST, lambda: self.store.read_bytes(join_uri(uri, MANIFEST)))
        try:
            manifest: dict[str, Any] = json.loads(data)
            entries = manifest["files"]
            named_step = int(manifest.get("step", -1))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise CheckpointCorruptError(f"{uri}: unreadable manifest: {err}") from err
        if not isinstance(entries, dict):
            raise CheckpointCorruptError(f"{uri}: unreadable manifest: files is not a mapping")
        if named_step != step:
            raise CheckpointCorruptError(f"{uri}: manifest names step {manifest.get('step')}")
        for required in (TRAINABLE, OPTIMIZER, STATE):
            if required not in entries:
                raise CheckpointCorruptError(f"{uri}: manifest lacks {required}")
        self._check_fingerprint(uri, manifest)
        return manifest

    def check_compatible(self) -> None:
        """Before a run writes anything under its output: raise CheckpointMismatchError when the newest complete
        checkpoint belongs to another run (manifests only; corrupt ones are left to `load_latest`)."""
        for step in self.complete_steps():
            try:
                self._manifest(self.uri_for(step), step)
            except CheckpointCorruptError:
                continue
            return

    def load(self, step: int, map_location: str | torch.device = "cpu") -> Loaded:
        """Download and verify one checkpoint. Raises CheckpointCorruptError when it does not verify,
        CheckpointUnavailableError when storage fails, CheckpointMismatchError when another run wrote it."""
        from safetensors.torch import load_file

        uri = self.uri_for(step)
        manifest = self._manifest(uri, step)
        entries: dict[str, dict[str, Any]] = manifest["files"]
        tmp = Path(tempfile.mkdtemp(prefix=f"load-{step}-", dir=self.scratch))
        try:
            for name, entry in entries.items():
                if "/" in name or name.startswith("."):
                    raise CheckpointCorruptError(f"{uri}: bad file name {name!r} in manifest")
                local = tmp / name
                self._read(uri, name, partial(self.store.download_file, join_uri(uri, name), local))
                size = local.stat().st_size
                if size != int(entry["size"]):
                    raise CheckpointCorruptError(f"{uri}/{name}: size {size} != manifest {entry['size']}")
                if _sha256_file(local) != entry["sha256"]:
                    raise CheckpointCorruptError(f"{uri}/{name}: sha256 does not match the manifest")
            try:
                trainable = load_file(str(tmp / TRAINABLE))
                ema = load_file(str(tmp / EMA)) if EMA in entries else None
                opt = torch.load(tmp / OPTIMIZER, map_location=map_location, weights_only=True)
                state = json.loads((tmp / STATE).read_text())
                config = json.loads((tmp / CONFIG).read_text()) if CONFIG in entries else {}
            except Exception as err:
                raise CheckpointCorruptError(f"{uri}: cannot deserialize: {err}") from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info = CheckpointInfo(
            step, uri, str(manifest.get("createdAt", "")), sum(int(e["size"]) for e in entries.values())
        )
        stored = manifest.get("fingerprint")
        fingerprint = stored.get("sha256") if isinstance(stored, dict) else None
        return Loaded(
            info, trainable, opt["optimizer"], opt.get("scheduler"), opt.get("scaler"), ema, state, config, fingerprint
        )

    def load_latest(self, map_location: str | torch.device = "cpu") -> Loaded | None:
        """The newest checkpoint that verifies; corrupt or partial ones are skipped with a warning. A storage
        failure (CheckpointUnavailableError) or another run's checkpoint (CheckpointMismatchError) raises."""
        for step in self.complete_steps():
            try:
                return self.load(step, map_location)
            except CheckpointCorruptError as err:
                self.log.warning("checkpoint_skipped", step=step, uri=self.uri_for(step), error=str(err))
        return None

    def latest_verified_step(self) -> int | None:
        """The step of the newest checkpoint whose files match its manifest (downloads it to check)."""
        loaded = self.load_latest()
        return loaded.info.step if loaded else None


@dataclass
class CheckpointStats:
    written: int = 0
    failures: int = 0
    last: CheckpointInfo | None = None


class AsyncCheckpointer:
    """Uploads snapshots in a background thread, at most one in flight.

    `submit()` waits for the previous upload first (that wait is part of the training stall). Callbacks run in
    the upload thread. Upload threads are daemon threads, so a process that gave up on an upload (`close` with a
    deadline) exits without waiting for it.
    """

    def __init__(
        self,
        ckpt: CheckpointStore,
        *,
        on_complete: Callable[[CheckpointInfo], None] | None = None,
        on_failure: Callable[[int, BaseException], None] | None = None,
    ) -> None:
        self.ckpt = ckpt
        self._inflight: Future[CheckpointInfo | None] | None = None
        self._inflight_step: int | None = None
        # Each write gets its own cancel flag, so cancelling one (a missed deadline) never cancels a later one.
        self._cancel = threading.Event()
        self._on_complete = on_complete
        self._on_failure = on_failure
        self.stats = CheckpointStats()

    def _run(
        self, snapshot: Snapshot, cancel: threading.Event, after: Callable[[], None] | None = None
    ) -> CheckpointInfo | None:
        try:
            info = self.ckpt.write(snapshot, cancel)
            if after is not None:
                after()
        except BaseException as err:
            self.stats.failures += 1
            self.ckpt.log.warning(
                "checkpoint_failed", step=snapshot.step, uri=self.ckpt.uri_for(snapshot.step), error=str(err)
            )
            if self._on_failure:
                self._on_failure(snapshot.step, err)
            return None
        self.stats.written += 1
        self.stats.last = info
        self.ckpt.log.info(
            "checkpoint_written",
            step=info.step,
            uri=info.uri,
            bytes=info.bytes,
            uploadSeconds=round(info.upload_seconds, 3),
        )
        if self._on_complete:
            self._on_complete(info)
        return info

    @property
    def busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def submit(self, snapshot: Snapshot, after: Callable[[], None] | None = None) -> None:
        """Start writing `snapshot` after the upload in flight; `after` runs in the upload thread once the
        checkpoint is complete (a failure in it counts as a failed checkpoint write)."""
        self.wait()
        self._start(snapshot, after)

    def _start(self, snapshot: Snapshot, after: Callable[[], None] | None = None) -> Future[CheckpointInfo | None]:
        cancel = self._cancel = threading.Event()
        future: Future[CheckpointInfo | None] = Future()

        def upload() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(self._run(snapshot, cancel, after))
            except BaseException as err:  # a callback failed: the waiter sees it, as with an executor
                future.set_exception(err)

        self._inflight, self._inflight_step = future, snapshot.step
        threading.Thread(target=upload, name="checkpoint-upload", daemon=True).start()
        return future

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the upload in flight; False when it is still running after `timeout` seconds."""
        if self._inflight is None:
            return True
        try:
            self._inflight.result(timeout=timeout)
        except TimeoutError:
            return False
        return True

    def write_sync(self, snapshot: Snapshot, deadline: float | None = None) -> CheckpointInfo | None:
        """Write a checkpoint and wait for it until `deadline` (monotonic). On timeout the write is cancelled
        before its manifest, so the previous checkpoint stays the valid one, and None is returned."""
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not self.wait(timeout):
            self._cancel.set()
            return None
        future = self._start(snapshot)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            self._cancel.set()
            return None

    def close(self, wait: bool = True, deadline: float | None = None) -> int | None:
        """Wait for the upload in flight, until `deadline` (monotonic) when given, or not at all with wait=False.
        An upload still running then is cancelled before its manifest and left behind; returns its step (None when
        nothing was left behind)."""
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if self.wait(timeout) if wait else not self.busy:
            return None
        self._cancel.set()
        return self._inflight_step

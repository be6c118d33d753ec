"""Step checkpoints in object storage: atomic by a manifest written last, verified on load, pruned to K.

`CheckpointStore` writes a `Snapshot` (format.py) under `<checkpoint uri>/step-XXXXXXXX/` (every file, then the
manifest), prunes to the newest `keep`, and reads back the newest one that verifies.

Reading tells three failures apart: a corrupt checkpoint (size or sha256 mismatch, an object the manifest lists
is missing, undecodable data, wrong step or name) is skipped for an older one; a storage or transport failure
raises `CheckpointUnavailableError` (retryable, the checkpoint is kept); a checkpoint of another run (its
fingerprint differs) raises `CheckpointMismatchError` (invalid input).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dreambooth_api.exitcodes import InvalidInputError, RetryableError
from dreambooth_trainer.checkpoint.fingerprint import RunFingerprint, fingerprint_mismatch
from dreambooth_trainer.checkpoint.format import (
    MANIFEST,
    REQUIRED,
    STEP_DIR,
    CheckpointInfo,
    Loaded,
    Snapshot,
    build_manifest,
    read_files,
    sha256_file,
    step_dir_name,
    write_files,
)
from dreambooth_trainer.logging import EventLog
from dreambooth_trainer.logging import log as default_log
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore, StorageError, join_uri


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


def is_transient(err: BaseException) -> bool:
    """A storage or transport failure that a retry may fix; a missing object is not one."""
    return isinstance(err, RetryableError | OSError) and not isinstance(err, ObjectNotFoundError)


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
            m = STEP_DIR.match(top)
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
        for required in REQUIRED:
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
                if sha256_file(local) != entry["sha256"]:
                    raise CheckpointCorruptError(f"{uri}/{name}: sha256 does not match the manifest")
            try:
                parts = read_files(tmp, entries, map_location)
            except Exception as err:
                raise CheckpointCorruptError(f"{uri}: cannot deserialize: {err}") from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info = CheckpointInfo(
            step, uri, str(manifest.get("createdAt", "")), sum(int(e["size"]) for e in entries.values())
        )
        stored = manifest.get("fingerprint")
        fingerprint = stored.get("sha256") if isinstance(stored, dict) else None
        opt = parts.optimizer_pt
        return Loaded(
            info,
            parts.trainable,
            opt["optimizer"],
            opt.get("scheduler"),
            opt.get("scaler"),
            parts.ema,
            parts.state,
            parts.config,
            fingerprint,
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


def resume_refusal(loaded: Loaded, max_steps: int) -> str | None:
    """Why a verified checkpoint must not be resumed (None when it may): one at or past maxSteps would be
    exported without training, so it must carry this run's fingerprint (a mismatch was refused on load)."""
    if loaded.info.step < max_steps or loaded.fingerprint is not None:
        return None
    return (
        f"checkpoint {loaded.info.uri} is at step {loaded.info.step} >= training.maxSteps {max_steps} and has no run "
        "fingerprint (an older trainer wrote it), so it cannot be shown to belong to this run; use a new output.uri "
        "(or output.checkpointUri), or delete its checkpoints"
    )

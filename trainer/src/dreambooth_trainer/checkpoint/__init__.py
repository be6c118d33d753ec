"""Step checkpoints: the format of a checkpoint folder, the store that writes, prunes and verifies them in object
storage, and the background writer that keeps uploads off the training loop.

- `format.py`: the files of `step-XXXXXXXX/` and the manifest written last (docs/contracts.md, object-storage layout).
- `fingerprint.py`: the run fingerprint in every manifest; only a checkpoint of the same run is resumed.
- `snapshot.py`: CPU copies of the training state (`to_cpu`, pinned `StagingBuffers` on CUDA).
- `store.py`: `CheckpointStore` (write, prune, load the newest that verifies) and the read errors.
- `writer.py`: `AsyncCheckpointer`, one upload in flight in a background thread.
"""

from __future__ import annotations

from dreambooth_trainer.checkpoint.fingerprint import RunFingerprint, fingerprint_mismatch, run_fingerprint
from dreambooth_trainer.checkpoint.format import (
    CONFIG,
    EMA,
    FORMAT_VERSION,
    MANIFEST,
    OPTIMIZER,
    STATE,
    TRAINABLE,
    CheckpointInfo,
    Loaded,
    Snapshot,
    build_manifest,
    step_dir_name,
    write_files,
)
from dreambooth_trainer.checkpoint.snapshot import StagingBuffers, to_cpu
from dreambooth_trainer.checkpoint.store import (
    CheckpointCancelledError,
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointStore,
    CheckpointUnavailableError,
    is_transient,
    resume_refusal,
)
from dreambooth_trainer.checkpoint.writer import AsyncCheckpointer, CheckpointStats

__all__ = [
    "CONFIG",
    "EMA",
    "FORMAT_VERSION",
    "MANIFEST",
    "OPTIMIZER",
    "STATE",
    "TRAINABLE",
    "AsyncCheckpointer",
    "CheckpointCancelledError",
    "CheckpointCorruptError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointStats",
    "CheckpointStore",
    "CheckpointUnavailableError",
    "Loaded",
    "RunFingerprint",
    "Snapshot",
    "StagingBuffers",
    "build_manifest",
    "fingerprint_mismatch",
    "is_transient",
    "resume_refusal",
    "run_fingerprint",
    "step_dir_name",
    "to_cpu",
    "write_files",
]

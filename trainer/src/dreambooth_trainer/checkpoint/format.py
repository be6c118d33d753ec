"""The checkpoint format: the folder `<checkpoint uri>/step-XXXXXXXX/`, its files and its manifest.

| file | what |
|---|---|
| `trainable.safetensors` | the trainable weights (`DreamBoothModule.trainable_state_dict()`) |
| `ema.safetensors` | EMA weights, when EMA is on |
| `optimizer.pt` | optimizer, LR scheduler and grad-scaler state dicts (`torch.load(weights_only=True)` reads it) |
| `state.json` | global step, sampler position (epoch, index), RNG states, world size, elapsed seconds |
| `config.json` | the resolved JobConfig |
| `manifest.json` | written last: each file's size and sha256, and the run fingerprint; it makes the folder complete |

`write_files` serializes a `Snapshot` into local files and `build_manifest` describes them; `read_files` reads a
verified folder back. Where the folders live and how they are uploaded is `store.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dreambooth_trainer.checkpoint.fingerprint import RunFingerprint
from dreambooth_trainer.logging import utc_now_iso

MANIFEST = "manifest.json"
TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
CONFIG = "config.json"
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


STEP_DIR = re.compile(r"^step-(\d{8,})$")
REQUIRED = (TRAINABLE, OPTIMIZER, STATE)
"""Files every manifest must list."""


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


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), read in 4 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(4 * 1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def write_files(snapshot: Snapshot, folder: Path) -> dict[str, Path]:
    """Serialize a snapshot into local files (everything but the manifest)."""
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
            name: {"size": path.stat().st_size, "sha256": sha256_file(path)} for name, path in sorted(files.items())
        },
    }
    if fingerprint is not None:
        manifest["fingerprint"] = fingerprint.to_wire()
    return manifest


@dataclass
class Parts:
    """The deserialized files of one checkpoint folder."""

    trainable: dict[str, torch.Tensor]
    optimizer_pt: dict[str, Any]
    """optimizer.pt: the optimizer, scheduler and scaler state dicts."""
    ema: dict[str, torch.Tensor] | None
    state: dict[str, Any]
    config: dict[str, Any]


def read_files(folder: Path, names: Mapping[str, Any], map_location: str | torch.device = "cpu") -> Parts:
    """Deserialize the files of a downloaded, verified folder (`names`: the manifest's files). Raises whatever
    the decoders raise on bad data."""
    return Parts(
        trainable=load_file(str(folder / TRAINABLE)),
        optimizer_pt=torch.load(folder / OPTIMIZER, map_location=map_location, weights_only=True),
        ema=load_file(str(folder / EMA)) if EMA in names else None,
        state=json.loads((folder / STATE).read_text()),
        config=json.loads((folder / CONFIG).read_text()) if CONFIG in names else {},
    )

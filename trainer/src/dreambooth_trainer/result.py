"""The run's outcome: the container termination message (at most 4 KiB) and `<output.uri>/result.json`.

Fields are documented in docs/contracts.md ("Termination message").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TERMINATION_ENV = "TERMINATION_MESSAGE_PATH"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_TERMINATION_BYTES = 4096


@dataclass
class RunResult:
    status: str
    """succeeded, failed or preempted."""
    reason: str | None = None
    message: str | None = None
    model_uri: str | None = None
    samples_uri: str | None = None
    steps: int | None = None
    final_loss: float | None = None
    duration_seconds: float | None = None
    last_checkpoint: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        out = {
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "modelUri": self.model_uri,
            "samplesUri": self.samples_uri,
            "steps": self.steps,
            "finalLoss": self.final_loss,
            "durationSeconds": None if self.duration_seconds is None else round(self.duration_seconds, 3),
            "lastCheckpoint": self.last_checkpoint,
        }
        return {k: v for k, v in out.items() if v is not None}


def encode_termination_message(doc: dict[str, Any], limit: int = MAX_TERMINATION_BYTES) -> bytes:
    """Compact JSON of at most `limit` bytes: the message is shortened (with "...") first, then dropped."""
    data = json.dumps(doc, separators=(",", ":")).encode()
    if len(data) <= limit:
        return data
    message = str(doc.get("message") or "")
    rest = dict(doc, message="")
    room = limit - len(json.dumps(rest, separators=(",", ":")).encode()) - 3
    if room > 0:
        # Binary search for the longest prefix whose escaped JSON fits (escapes and UTF-8 make bytes != chars).
        lo, hi, best = 1, min(len(message), room), b""
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = json.dumps(dict(doc, message=message[:mid] + "..."), separators=(",", ":")).encode()
            if len(candidate) <= limit:
                lo, best = mid + 1, candidate
            else:
                hi = mid - 1
        if best:
            return best
    data = json.dumps({k: v for k, v in doc.items() if k != "message"}, separators=(",", ":")).encode()
    if len(data) <= limit:
        return data
    return json.dumps({"status": doc.get("status"), "reason": doc.get("reason")}).encode()[:limit]


def write_termination_message(doc: dict[str, Any], path: str | None = None) -> bool:
    """Write the termination message; False (never an exception) when the path is not writable."""
    target = Path(path or os.environ.get(TERMINATION_ENV) or DEFAULT_TERMINATION_PATH)
    try:
        target.write_bytes(encode_termination_message(doc))
    except OSError:
        return False
    return True

"""Structured log lines: one JSON object per line on stdout, one line per event.

The operator and `dreambooth run --local` parse these lines (see docs/contracts.md, Logs), so an event's
fields are a contract: add fields freely, never rename or remove them.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from datetime import UTC, datetime
from typing import IO, Any


def utc_now_iso() -> str:
    """The current time as an RFC 3339 UTC string with milliseconds, e.g. 2026-11-27T00:00:00.123Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/inf are not JSON; a diverged loss shows as null
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class EventLog:
    """Writes `{"ts", "level", "event", ...context, ...fields}` lines. Thread-safe; every line is flushed."""

    def __init__(self, stream: IO[str] | None = None, **context: Any) -> None:
        self._stream = stream
        self._context = dict(context)
        self._lock = threading.Lock()

    def bind(self, **context: Any) -> None:
        """Add fields that every later line carries (rank, attempt, job)."""
        self._context.update(context)

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        record = {"ts": utc_now_iso(), "level": level, "event": event, **self._context, **fields}
        line = json.dumps(_jsonable(record), separators=(",", ":"))
        stream = self._stream or sys.stdout
        with self._lock:
            stream.write(line + "\n")
            stream.flush()

    def info(self, event: str, **fields: Any) -> None:
        self.emit(event, "info", **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit(event, "warning", **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit(event, "error", **fields)


# The process-wide log; the CLI binds rank/attempt/job to it.
log = EventLog()

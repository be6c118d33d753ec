"""`metrics.jsonl` under the output: one JSON line per optimizer step (step, loss, lr, time).

Rank 0 keeps the lines in memory and uploads the whole file after each checkpoint and at the end; a resumed run
starts from the lines up to its checkpoint's step, so the file holds every step once.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from dreambooth_trainer.logging import utc_now_iso
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore


class StepMetrics:
    """The lines of `uri` (metrics.jsonl) of this run."""

    def __init__(self, store: ObjectStore, uri: str) -> None:
        self.store = store
        self.uri = uri
        self.lines: list[str] = []

    def append(self, step: int, loss: float, lr: float) -> None:
        self.lines.append(json.dumps({"step": step, "loss": loss, "lr": lr, "time": utc_now_iso()}))

    def load(self, step: int) -> None:
        """Take over the uploaded lines up to `step` (the checkpoint a run resumes from)."""
        try:
            text = self.store.read_bytes(self.uri).decode()
        except ObjectNotFoundError:
            return
        for line in text.splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    self.lines.append(line)
            except (ValueError, KeyError, TypeError):
                continue

    def uploader(self) -> Callable[[], None]:
        """Uploads metrics.jsonl as it is now (run in the upload thread after the checkpoint)."""
        data = self._data()

        def upload() -> None:
            self.store.write_bytes(self.uri, data)

        return upload

    def upload(self) -> None:
        if self.lines:
            self.store.write_bytes(self.uri, self._data())

    def last_loss(self) -> float | None:
        """The loss of the last line (None without lines, or when it was not a number)."""
        if not self.lines:
            return None
        value = json.loads(self.lines[-1]).get("loss")
        return float(value) if isinstance(value, int | float) else None

    def _data(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()

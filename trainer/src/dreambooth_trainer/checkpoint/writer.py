"""The asynchronous checkpoint writer: snapshots are serialized and uploaded in a background thread.

Writing happens from a CPU snapshot (`Snapshot`), so the training loop is blocked only while tensors are copied;
`AsyncCheckpointer` serializes and uploads in one background thread, at most one in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from dreambooth_trainer.checkpoint.format import CheckpointInfo, Snapshot
from dreambooth_trainer.checkpoint.store import CheckpointStore


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

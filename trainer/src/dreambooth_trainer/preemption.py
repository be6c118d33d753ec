"""SIGTERM handling: a flag that the training loop polls, and a deadline for the final checkpoint.

Kubernetes sends SIGTERM and kills the container `terminationGracePeriodSeconds` later. The handler only
records the time; the loop finishes its current step, writes a checkpoint synchronously before
`deadline()`, writes the result with status "preempted" and exits with ExitCode.PREEMPTED. When an upload was
left running, `exit_at_grace_end` ends the process at the end of the grace period instead of waiting for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from dreambooth_api import env

DEFAULT_GRACE_SECONDS = 25.0
# Time kept back from the grace period for writing the result and exiting.
EXIT_MARGIN_SECONDS = 3.0
# Registered by every rank (cli.main) with faulthandler: dump all threads' stacks to stderr, even while the main
# thread is blocked in C (a Python-level handler would never run there). A signal whose default action is to be
# ignored: a rank without the handler (still importing, or past its result and tearing down, when faulthandler is
# gone) must not die of it. SIGUSR2 did kill such a rank (exit -12, the pod failed instead of preempted).
STACK_DUMP_SIGNAL = signal.SIGURG


def grace_seconds() -> float:
    raw = os.environ.get(env.GRACE_SECONDS)
    try:
        return float(raw) if raw else DEFAULT_GRACE_SECONDS
    except ValueError:
        return DEFAULT_GRACE_SECONDS


class Preemption:
    """Installs SIGTERM (and SIGINT, for Ctrl-C in local runs) handlers while active."""

    def __init__(self, grace: float | None = None, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.grace = grace_seconds() if grace is None else grace
        self._signals = signals
        self._received_at: float | None = None
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread, and again inside itself when another signal comes meanwhile
        # (Python handlers nest): a rank gets the container's SIGTERM and, microseconds later, the supervisor's
        # forwarded copy. So it only assigns attributes (`requested` is `_received_at` set). It used to set a
        # threading.Event, whose lock a nested call then waited for forever while its own outer call held it: the
        # multi-rank pod that hung until SIGKILL.
        self.trigger(signal.Signals(signum).name)

    def install(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def trigger(self, name: str = "manual") -> None:
        """Request preemption without a signal (tests, and a peer rank's request); the signal handler's body, so it
        only assigns attributes (the first request's time and name stay)."""
        if self._received_at is None:
            self._received_at = time.monotonic()
            self.signal_name = name

    @property
    def requested(self) -> bool:
        return self._received_at is not None

    def deadline(self) -> float:
        """The monotonic time by which the checkpoint upload must be done (now + grace when not requested)."""
        start = self._received_at if self._received_at is not None else time.monotonic()
        return start + max(self.grace - EXIT_MARGIN_SECONDS, 1.0)

    def seconds_left(self) -> float:
        return max(self.deadline() - time.monotonic(), 0.0)

    def exit_at_grace_end(self, code: int) -> threading.Thread:
        """End the process with `code` (os._exit, after flushing stdout and stderr) when the grace period is over.

        For a process whose result is written but which cannot exit: the interpreter joins non-daemon threads at
        exit, such as the transfer threads of an abandoned upload, until SIGKILL turns the exit code into 137."""
        end = (self._received_at if self._received_at is not None else time.monotonic()) + self.grace

        def watchdog() -> None:
            time.sleep(max(end - time.monotonic(), 0.0))
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(code)

        thread = threading.Thread(target=watchdog, name="preemption-exit", daemon=True)
        thread.start()
        return thread

"""Start, watch and stop the test servers (etcd, kube-*, weed, prometheus, ...) as local processes.

Everything binds to loopback on free ports. Readiness is always decided by polling a condition with a
deadline (`wait_until`); a timeout raises `NotReadyError` whose message carries the tail of the server's log.
Every started process is recorded in `REGISTRY`, which the pytest plugin uses to attach log tails to the
report of a failing test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from tests.infra.paths import ROOT

TOOLS_BIN = ROOT / ".tools" / "bin"

DEFAULT_TIMEOUT_S = 120.0
LOG_TAIL_LINES = 40


class NotReadyError(RuntimeError):
    """A condition did not become true before its deadline (the message says what and shows the log tail)."""


def tool(name: str) -> Path:
    """Path of a pinned test binary in `.tools/bin` (built by tests/infra/build-binaries.sh)."""
    path = TOOLS_BIN / name
    if not path.exists():
        msg = f"{path} is missing: run `make binaries` (tests/infra/build-binaries.sh)"
        raise FileNotFoundError(msg)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host` (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports (all sockets are held open until every port is chosen)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a text file ("" when it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    condition: Callable[[], bool],
    *,
    what: str,
    timeout: float = DEFAULT_TIMEOUT_S,
    interval: float = 0.2,
    details: Callable[[], str] | None = None,
) -> None:
    """Poll `condition` until it returns True; raise `NotReadyError` after `timeout` seconds.

    Exceptions raised by `condition` count as "not yet" (the last one is reported), except `NotReadyError`
    (and so `ProcessExitedError`), which ends the wait at once. `details` adds context
    (for example a log tail) to the error message.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if condition():
                return
            last_error = None
        except NotReadyError:
            raise  # a definite failure (e.g. the process exited): waiting longer cannot help
        except Exception as exc:  # a server that is still starting refuses connections, returns 500s, ...
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    msg = f"timed out after {timeout:.0f}s waiting for {what}"
    if last_error is not None:
        msg += f" (last error: {type(last_error).__name__}: {last_error})"
    if details is not None:
        msg += "\n" + details()
    raise NotReadyError(msg)


def http_get(
    url: str, *, timeout: float = 5.0, insecure: bool = False, headers: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """GET `url`; return (status, body). HTTP errors are returned, not raised. `insecure` skips TLS checks."""
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context()
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310 - our own loopback servers
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode("utf-8", errors="replace")


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class ManagedProcess:
    """A server process started by the test infrastructure, logging stdout+stderr to `log_path`."""

    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    _log_file: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return tail(self.log_path, lines)

    def describe(self) -> str:
        """Status line plus log tail, for error messages."""
        status = "running" if self.running() else f"exited with code {self.popen.returncode}"
        return f"--- {self.name} ({status}), log {self.log_path}, last lines:\n{self.log_tail()}"

    def wait_ready(
        self, condition: Callable[[], bool], *, what: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        """Poll `condition` until True; fail fast (with the log tail) if the process exits meanwhile."""

        def check() -> bool:
            if not self.running():
                msg = f"{self.name} exited with code {self.popen.returncode} before it was ready"
                raise ProcessExitedError(msg + "\n" + self.describe())
            return condition()

        wait_until(check, what=what or f"{self.name} to become ready", timeout=timeout, details=self.describe)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit code. Idempotent."""
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGTERM)
                try:
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.popen.pid, signal.SIGKILL)
                    self.popen.wait(timeout=30)
            else:
                # The leader exited; children in its group may remain.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
            return self.popen.returncode
        finally:
            self._log_file.close()
            REGISTRY.remove(self)


class ProcessExitedError(NotReadyError):
    """The process exited before it became ready."""


class ProcessRegistry:
    """Every process started through `start_process` and not yet stopped (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: list[ManagedProcess] = []

    def add(self, proc: ManagedProcess) -> None:
        with self._lock:
            self._procs.append(proc)

    def remove(self, proc: ManagedProcess) -> None:
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def all(self) -> list[ManagedProcess]:
        with self._lock:
            return list(self._procs)


REGISTRY = ProcessRegistry()


SETPRIV = shutil.which("setpriv")


def _die_with_parent_prefix() -> list[str]:
    """Argv prefix that makes the server get SIGKILL when the thread that started it dies (PR_SET_PDEATHSIG).

    Servers run in their own sessions (so that stop() can signal the whole group); without this, a pytest
    killed with SIGKILL or by a timeout would leave them running. `setpriv` (util-linux) sets the flag and
    execs the server, so no Python runs between fork and exec. Only from the main thread: from another
    thread the signal would fire as soon as that thread exits.
    """
    if SETPRIV is None or threading.current_thread() is not threading.main_thread():
        return []
    return [SETPRIV, "--pdeathsig", "KILL", "--"]


def start_process(
    name: str,
    args: Sequence[str | Path],
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start `args` in its own process group, stdout+stderr appended to `log_dir/<name>.log`.

    `env` is added to (not replacing) the current environment. The process is recorded in `REGISTRY`.
    Started from the main thread, the process is killed when pytest dies (see `_die_with_parent_prefix`).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    argv = [str(a) for a in args]
    log_file = log_path.open("ab")
    log_file.write(f"$ {' '.join(argv)}\n".encode())
    log_file.flush()
    full_env = {**os.environ, **(env or {})}
    popen = subprocess.Popen(
        [*_die_with_parent_prefix(), *argv],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    proc = ManagedProcess(name=name, args=argv, log_path=log_path, popen=popen, _log_file=log_file)
    REGISTRY.add(proc)
    return proc


def is_port_clash(error: BaseException) -> bool:
    """True when a server failed because its port was taken meanwhile (free ports are only free when chosen)."""
    return isinstance(error, ProcessExitedError) and "address already in use" in str(error).lower()


T = TypeVar("T")


def retry_on_port_clash(attempt: Callable[[], T], *, attempts: int = 3) -> T:
    """Call `attempt` (which picks free ports, starts a server and waits for it) again when it fails with a
    port clash. `attempt` must stop its own process before raising."""
    for remaining in range(attempts - 1, -1, -1):
        try:
            return attempt()
        except ProcessExitedError as err:
            if remaining == 0 or not is_port_clash(err):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def stop_all(procs: Sequence[ManagedProcess], grace: float = 10.0) -> None:
    """Stop processes in reverse start order (dependents first); never raises for one that is gone."""
    for proc in reversed(procs):
        with contextlib.suppress(Exception):
            proc.stop(grace)

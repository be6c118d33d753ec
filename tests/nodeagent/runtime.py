"""Containers as process groups, with CRI-style log files.

Each container run is ``Popen(start_new_session=True)``: it leads its own process group, so SIGTERM/SIGKILL reach
everything it started, like signals to a container's PID namespace. Its stdout and stderr go through a pipe to a
pump thread that writes the CRI log format (``<RFC3339Nano> <F|P> <text>``: F for a full line, P for a partial
one), which is what lets the log server honour ``timestamps`` and ``sinceSeconds``. A ``.done`` file beside the
log says the stream is complete (for ``follow``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

PR_SET_PDEATHSIG = 1
CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RDONLY = 1
MS_REMOUNT = 32
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child must not load libraries


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def child_setup(hosts_file: Path | None, binds: Sequence[tuple[Path, str, bool]] = ()) -> Callable[[], None]:
    """What the child does between fork and exec.

    - SIGKILL when the agent thread that started it dies (an agent crash or kill must not leave pod processes
      behind; a clean stop terminates them itself).
    - With ``hosts_file`` or ``binds``: its own mount namespace, with ``hosts_file`` bind-mounted over
      ``/etc/hosts`` (the pod resolves names as its namespace's DNS search path would; see hostsfile.py) and each
      ``(source, target, read_only)`` of ``binds`` bind-mounted at ``target`` (volumes.py: the ServiceAccount token).
    """
    target = str(hosts_file).encode() if hosts_file is not None else None
    mounts = [(str(src).encode(), dst.encode(), read_only) for src, dst, read_only in binds]

    def setup() -> None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if target is None and not mounts:
            return
        _check(_LIBC.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(_LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        if target is not None:
            _check(_LIBC.mount(target, b"/etc/hosts", None, MS_BIND, None), "bind-mount /etc/hosts")
        for src, dst, read_only in mounts:
            _check(_LIBC.mount(src, dst, None, MS_BIND, None), "bind-mount a volume")
            if read_only:
                _check(_LIBC.mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None), "remount read-only")

    return setup


def private_hosts_supported(hosts_file: Path) -> bool:
    """Whether this machine lets the agent give processes their own /etc/hosts (root, mount namespaces)."""
    try:
        result = subprocess.run(["true"], preexec_fn=child_setup(hosts_file), check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def bind_mounts_supported(probe_dir: Path) -> bool:
    """Whether this machine lets the agent bind-mount a folder for one process only (volumes.py needs it)."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    try:
        setup = child_setup(None, [(probe_dir, str(probe_dir), True)])
        result = subprocess.run(["true"], preexec_fn=setup, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def process_running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_process_exit(pid: int, timeout: float) -> bool:
    """Poll until ``pid`` no longer runs; False when it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while process_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def now_nano() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}000Z"


@dataclass(frozen=True)
class LogRecord:
    time: str
    full: bool
    text: str


def parse_records(data: str) -> Iterator[LogRecord]:
    """Records of a CRI log (complete lines only; the caller keeps an unfinished last line for later)."""
    for line in data.splitlines():
        ts, _, rest = line.partition(" ")
        tag, _, text = rest.partition(" ")
        yield LogRecord(ts, tag == "F", text)


def render_records(records: Sequence[LogRecord], *, timestamps: bool, tail_lines: int | None = None) -> str:
    """Records as the container wrote them; with ``timestamps`` each line starts with its time, as kubectl shows."""
    lines: list[str] = []
    current = ""
    start_time = ""
    for record in records:
        if not current:
            start_time = record.time
        current += record.text
        if record.full:
            lines.append(f"{start_time} {current}\n" if timestamps else current + "\n")
            current = ""
    if current:
        lines.append(f"{start_time} {current}" if timestamps else current)
    if tail_lines is not None:
        lines = lines[-tail_lines:] if tail_lines > 0 else []
    return "".join(lines)


def read_log(path: Path, *, timestamps: bool = False, tail_lines: int | None = None, since: str | None = None) -> str:
    """A container log file as text (records at or after ``since``, an RFC3339 time, when given; nanoseconds are
    truncated to microseconds)."""
    if not path.exists():
        return ""
    records = list(parse_records(path.read_text(errors="replace")))
    if since:
        start = datetime.fromisoformat(since)
        records = [r for r in records if datetime.fromisoformat(r.time) >= start]
    return render_records(records, timestamps=timestamps, tail_lines=tail_lines)


class ContainerProcess:
    """One run of a container: a process group writing to ``log_path``."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        hosts_file: Path | None = None,
        binds: Sequence[tuple[Path, str, bool]] = (),
    ) -> None:
        self.log_path = log_path
        self.done_path = log_path.with_suffix(".done")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = datetime.now(UTC)
        self._proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=child_setup(hosts_file, binds),  # noqa: PLW1509 (only system calls through a preloaded libc)
        )
        self.pid = self._proc.pid
        self._pump = threading.Thread(target=self._copy_output, name=f"log-{log_path.stem}-{self.pid}", daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        with self.log_path.open("a", encoding="utf-8") as out:
            pending = b""
            while chunk := os.read(fd, 65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    out.write(f"{now_nano()} F {line.decode('utf-8', 'replace')}\n")
                if pending and len(pending) > 16384:
                    out.write(f"{now_nano()} P {pending.decode('utf-8', 'replace')}\n")
                    pending = b""
                out.flush()
            if pending:
                out.write(f"{now_nano()} P {pending.decode('utf-8', 'replace')}\n")
        self._proc.stdout.close()
        self.done_path.touch()

    def poll(self) -> int | None:
        """The Popen returncode once the process has exited and its output is on disk, else None."""
        code = self._proc.poll()
        if code is None:
            return None
        # The leader is gone: like a container whose PID 1 exits, the rest of its group goes too.
        self.signal(signal.SIGKILL)
        self._pump.join(timeout=5)
        return code

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.poll()

"""The process helper: free ports, polling with deadlines, log capture, SIGTERM-then-SIGKILL stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.infra.paths import ROOT
from tests.infra.processes import (
    REGISTRY,
    ManagedProcess,
    NotReadyError,
    ProcessExitedError,
    free_port,
    free_ports,
    retry_on_port_clash,
    start_process,
    tail,
    tcp_open,
    wait_until,
)


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in [*ports, free_port()]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_wait_until_returns_once_the_condition_holds() -> None:
    calls: list[int] = []

    def third_time_lucky() -> bool:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("not yet")
        return True

    wait_until(third_time_lucky, what="luck", timeout=10, interval=0.01)
    assert len(calls) == 3


def test_wait_until_times_out_with_what_last_error_and_details() -> None:
    def refuse() -> bool:
        raise ConnectionRefusedError("port closed")

    start = time.monotonic()
    with pytest.raises(NotReadyError) as excinfo:
        wait_until(refuse, what="the widget", timeout=0.3, interval=0.05, details=lambda: "LOG TAIL HERE")
    assert time.monotonic() - start < 5
    message = str(excinfo.value)
    assert "the widget" in message
    assert "port closed" in message
    assert "LOG TAIL HERE" in message


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 3).splitlines() == ["line 97", "line 98", "line 99"]
    assert tail(tmp_path / "missing.log") == ""


def test_process_logs_to_its_file_and_readiness_by_tcp(tmp_path: Path) -> None:
    port = free_port()
    script = (
        "import socket, sys, time\n"
        "print('starting up', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
        "time.sleep(60)\n"
    )
    proc = start_process("tcp-server", [sys.executable, "-c", script, str(port)], log_dir=tmp_path)
    try:
        assert proc in REGISTRY.all()
        proc.wait_ready(lambda: tcp_open("127.0.0.1", port), timeout=30)
        assert "starting up" in proc.log_tail()
        assert "to stderr" in proc.log_tail()
    finally:
        code = proc.stop(grace=5)
    assert code == -signal.SIGTERM
    assert proc not in REGISTRY.all()
    assert (tmp_path / "tcp-server.log").read_text().startswith("$ ")


def test_early_exit_fails_fast_with_the_log_tail(tmp_path: Path) -> None:
    script = "import sys; print('fatal: bad flag --nope', flush=True); sys.exit(3)"
    proc = start_process("broken", [sys.executable, "-c", script], log_dir=tmp_path)
    start = time.monotonic()
    with pytest.raises(ProcessExitedError) as excinfo:
        proc.wait_ready(lambda: False, timeout=60)
    assert time.monotonic() - start < 30
    assert "exited with code 3" in str(excinfo.value)
    assert "fatal: bad flag --nope" in str(excinfo.value)
    proc.stop()


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring', 'SIGTERM', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = start_process("stubborn", [sys.executable, "-c", script], log_dir=tmp_path)
    # The log starts with the command line; wait for the exact line that only the process prints.
    proc.wait_ready(lambda: "ignoring SIGTERM" in proc.log_tail().splitlines(), timeout=30)
    start = time.monotonic()
    code = proc.stop(grace=0.5)
    assert code == -signal.SIGKILL
    assert time.monotonic() - start < 20
    assert not proc.running()


def test_servers_die_with_a_killed_test_session(tmp_path: Path) -> None:
    """A pytest killed by SIGKILL (timeouts, OOM) must not leave its servers running."""
    root = ROOT
    parent_script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from pathlib import Path\n"
        "from tests.infra.processes import start_process\n"
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
        "p = start_process('orphan', sleeper, log_dir=Path(sys.argv[1]))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
    finally:
        parent.kill()
        parent.wait(timeout=30)
    wait_until(lambda: not _alive(child_pid), what=f"orphaned server {child_pid} to die", timeout=30)


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


LISTENER = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "print('listening', flush=True); time.sleep(60)\n"
)


def test_retry_on_port_clash_moves_to_a_new_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        candidates = iter([busy.getsockname()[1], free_port()])
        tried: list[int] = []

        def attempt() -> ManagedProcess:
            port = next(candidates)
            tried.append(port)
            proc = start_process("listener", [sys.executable, "-c", LISTENER, str(port)], log_dir=tmp_path)
            try:
                # (Not a TCP probe: the busy port accepts connections too.)
                proc.wait_ready(lambda: "listening" in proc.log_tail().splitlines(), timeout=30)
            except BaseException:
                proc.stop()
                raise
            return proc

        proc = retry_on_port_clash(attempt)
        try:
            assert len(tried) == 2
            assert proc.running()
        finally:
            proc.stop()
    assert "Address already in use" in (tmp_path / "listener.log").read_text()


def test_retry_on_port_clash_does_not_retry_other_failures(tmp_path: Path) -> None:
    calls: list[int] = []

    def attempt() -> None:
        calls.append(1)
        proc = start_process("crash", [sys.executable, "-c", "raise SystemExit('config error')"], log_dir=tmp_path)
        try:
            proc.wait_ready(lambda: False, timeout=30)
        finally:
            proc.stop()

    with pytest.raises(ProcessExitedError, match="config error"):
        retry_on_port_clash(attempt)
    assert calls == [1]

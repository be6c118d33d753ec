"""The fixtures plugin attaches server log tails to failing tests and keeps the log dir (only then)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.infra.paths import ROOT

INNER_TESTS = """
import sys

import pytest
from tests.infra.processes import start_process, tcp_open, free_port


def _server(infra_log_dir, name):
    port = free_port()
    script = (
        "import socket, sys, time\\n"
        "print('hello', 'from', sys.argv[2], flush=True)\\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(60)\\n"
    )
    proc = start_process(name, [sys.executable, "-c", script, str(port), name], log_dir=infra_log_dir)
    proc.wait_ready(lambda: tcp_open("127.0.0.1", port), timeout=60)
    return proc


@pytest.fixture
def server(infra_log_dir):
    proc = _server(infra_log_dir, "fake-server")
    yield proc
    proc.stop()


def test_with_server(server, infra_log_dir):
    (infra_log_dir / "side-agent.log").write_text("a line from the side agent\\n")
    assert OUTCOME
"""


def run_inner(tmp_path: Path, outcome: str) -> tuple[subprocess.CompletedProcess[str], str]:
    (tmp_path / "test_inner.py").write_text(INNER_TESTS.replace("OUTCOME", outcome))
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    # TMPDIR puts the plugin's log and work dirs under tmp_path, where the assertions look for them.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_ADDOPTS": "", "TMPDIR": str(scratch)}
    env.pop("DBO_TEST_LOG_DIR", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.infra.fixtures",
            "-p",
            "no:cacheprovider",
            "-q",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            str(tmp_path / "test_inner.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return result, result.stdout + result.stderr


def test_failure_attaches_log_tail_and_keeps_logs(tmp_path: Path) -> None:
    result, output = run_inner(tmp_path, "False")
    assert result.returncode == 1, output
    # The fixture's server was running when the test body failed: its log tail is in the report.
    assert "log tail: fake-server" in output
    assert "hello from fake-server" in output
    # Other logs written in the log dir during the test are attached too.
    assert "log tail: side-agent" in output
    assert "a line from the side agent" in output
    match = re.search(r"test server logs kept in (\S+)", output)
    assert match, output
    kept = Path(match.group(1))
    assert kept.parent == tmp_path / "tmp"
    assert "hello from fake-server" in (kept / "fake-server.log").read_text()


def test_success_removes_the_logs(tmp_path: Path) -> None:
    result, output = run_inner(tmp_path, "True")
    assert result.returncode == 0, output
    assert "log tail:" not in output
    assert "logs kept" not in output
    assert list((tmp_path / "tmp").glob("dbo-test-*")) == []

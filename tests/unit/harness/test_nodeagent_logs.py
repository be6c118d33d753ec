"""CRI-style container logs of the test node agent: writing through a real process, and reading them back."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.nodeagent import layout
from tests.nodeagent.runtime import (
    ContainerProcess,
    LogRecord,
    parse_records,
    process_running,
    read_log,
    render_records,
    wait_process_exit,
)

RECORDS = [
    LogRecord("2026-11-27T00:00:00.000000001Z", True, "first"),
    LogRecord("2026-11-27T00:00:01.000000000Z", False, "par"),
    LogRecord("2026-11-27T00:00:02.000000000Z", True, "tial"),
    LogRecord("2026-11-27T00:00:03.000000000Z", False, "no newline"),
]


def test_render_joins_partial_records_into_lines() -> None:
    assert render_records(RECORDS, timestamps=False) == "first\npartial\nno newline"


def test_render_with_timestamps_uses_each_line_start() -> None:
    assert render_records(RECORDS, timestamps=True).splitlines() == [
        "2026-11-27T00:00:00.000000001Z first",
        "2026-11-27T00:00:01.000000000Z partial",
        "2026-11-27T00:00:03.000000000Z no newline",
    ]


@pytest.mark.parametrize(("tail", "expected"), [(1, "no newline"), (2, "partial\nno newline"), (0, ""), (9, None)])
def test_render_tail_lines(tail: int, expected: str | None) -> None:
    full = render_records(RECORDS, timestamps=False)
    assert render_records(RECORDS, timestamps=False, tail_lines=tail) == (full if expected is None else expected)


def test_parse_keeps_spaces_in_text() -> None:
    assert list(parse_records("2026-11-27T00:00:00Z F a  b \n")) == [LogRecord("2026-11-27T00:00:00Z", True, "a  b ")]


def test_process_output_is_logged_and_exit_code_reported(tmp_path: Path) -> None:
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.stdout.write('tail'); sys.exit(3)"
    log = tmp_path / "logs" / "c" / "0.log"
    process = ContainerProcess([sys.executable, "-c", code], {"PYTHONUNBUFFERED": "1"}, tmp_path, log)
    deadline = time.monotonic() + 30
    while (returncode := process.poll()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert returncode == 3
    assert sorted(read_log(log).splitlines()) == ["err", "out", "tail"]
    assert log.with_suffix(".done").exists()
    assert read_log(log, since="2999-01-01T00:00:00Z") == ""


def test_signal_reaches_the_whole_process_group(tmp_path: Path) -> None:
    # The child starts a grandchild and waits; SIGTERM to the group must end both.
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print(p.pid, flush=True); time.sleep(600)"
    )
    log = tmp_path / "0.log"
    process = ContainerProcess([sys.executable, "-c", code], {}, tmp_path, log)
    deadline = time.monotonic() + 30
    while not read_log(log).strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(read_log(log).split()[0])
    process.signal(signal.SIGTERM)
    assert process.wait(30) == -signal.SIGTERM
    assert wait_process_exit(grandchild, 10), "the grandchild outlived its process group's SIGTERM"


def test_layout_finds_the_newest_pod_and_previous_run(tmp_path: Path) -> None:
    old = layout.pod_dir(tmp_path, "ns", "p", "uid-1")
    new = layout.pod_dir(tmp_path, "ns", "p", "uid-2")
    layout.write_pod_info(old, {"created": 1.0, "containers": ["a"]})
    layout.write_pod_info(new, {"created": 2.0, "containers": ["b", "c"], "defaultContainer": None})
    assert layout.latest_pod_dir(tmp_path, "ns", "p") == new
    assert layout.latest_pod_dir(tmp_path, "ns", "other") is None
    assert layout.default_container(new) == "b"
    for run in (0, 1, 2):
        path = layout.log_path(new, "b", run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    assert layout.find_log(new, "b") == layout.log_path(new, "b", 2)
    assert layout.find_log(new, "b", previous=True) == layout.log_path(new, "b", 1)
    assert layout.find_log(new, "c") is None


def test_process_running_tells_live_from_gone(tmp_path: Path) -> None:
    assert process_running(os.getpid())
    process = ContainerProcess([sys.executable, "-c", "pass"], {}, tmp_path, tmp_path / "0.log")
    assert process.wait(30) == 0
    assert not process_running(process.pid)

"""The fake kubelet's log endpoint (what the apiserver proxies ``kubectl logs`` to), over real HTTPS."""

from __future__ import annotations

import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodeagent import layout
from tests.nodeagent.certs import write_self_signed
from tests.nodeagent.logserver import LogServer


def record(text: str, second: int, full: bool = True) -> str:
    return f"2026-11-27T00:00:{second:02d}.000000000Z {'F' if full else 'P'} {text}\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LogServer]:
    pod = layout.pod_dir(tmp_path, "ns", "p", "uid-1")
    layout.write_pod_info(pod, {"created": 1.0, "containers": ["main"]})
    for run, lines in ((0, ["old run"]), (1, ["one", "two", "three"])):
        path = layout.log_path(pod, "main", run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(record(line, i) for i, line in enumerate(lines)))
    layout.log_path(pod, "main", 0).with_suffix(".done").touch()
    write_self_signed(tmp_path / "tls.crt", tmp_path / "tls.key")
    srv = LogServer(tmp_path, tmp_path / "tls.crt", tmp_path / "tls.key")
    srv.start()
    yield srv
    srv.stop()


def get(server: LogServer, path: str) -> tuple[int, str]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # like the apiserver without --kubelet-certificate-authority
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{server.port}{path}", context=context, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ("", "one\ntwo\nthree\n"),
        ("?tailLines=2", "two\nthree\n"),
        ("?timestamps=true&tailLines=1", "2026-11-27T00:00:02.000000000Z three\n"),
        ("?previous=true", "old run\n"),
        ("?limitBytes=5", "one\nt"),
        ("?sinceTime=2026-11-27T00:00:01Z", "two\nthree\n"),
    ],
)
def test_container_logs(server: LogServer, query: str, body: str) -> None:
    assert get(server, f"/containerLogs/ns/p/main{query}") == (200, body)


def test_unknown_pod_and_path(server: LogServer) -> None:
    assert get(server, "/containerLogs/ns/nope/main")[0] == 404
    assert get(server, "/pods")[0] == 404


def test_follow_streams_until_the_container_is_done(server: LogServer) -> None:
    log = layout.log_path(layout.pod_dir(server.root, "ns", "p", "uid-1"), "main", 1)

    def finish_later() -> None:
        time.sleep(0.5)  # the follower must be waiting on new output when it arrives
        with log.open("a") as handle:
            handle.write(record("four", 3, full=False))
            handle.write(record("!", 4))
        log.with_suffix(".done").touch()

    writer = threading.Thread(target=finish_later)
    writer.start()
    status, body = get(server, "/containerLogs/ns/p/main?follow=true")
    writer.join()
    assert status == 200
    assert body == "one\ntwo\nthree\nfour!\n"

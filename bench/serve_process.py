"""The serving benchmark's server launch: a `dreambooth-serve` process (`python -m dreambooth_trainer.serving.server`,
the console script's code) on a free loopback port, with a ServeConfig, until /readyz says ready (bench_serve.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(config: dict[str, Any], workdir: Path, log: Path, timeout: float = 600) -> Iterator[str]:
    """A `dreambooth-serve` process with `config`; yields its base URL once /readyz says ready."""
    port = _free_port()
    env = {
        **os.environ,
        "DREAMBOOTH_SERVE_CONFIG": json.dumps(config),
        "DREAMBOOTH_WORKDIR": str(workdir),
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "trainer" / "src"), str(ROOT / "api" / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    env.pop("DREAMBOOTH_SERVE_TOKEN", None)
    argv = [sys.executable, "-m", "dreambooth_trainer.serving.server", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited {proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready in {timeout:g}s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:  # noqa: S310 - a local URL
            return bool(response.status == 200)
    except OSError:
        return False

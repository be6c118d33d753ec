"""Helpers for tests that run `dreambooth-train` as real subprocesses against the S3 server.

`TrainerRun` starts the CLI, collects its JSON log lines in a thread, and lets a test wait for an event,
send a signal, and read the exit code and termination message. `tiny_job` writes a handful of PIL images to
a bucket and returns a JobConfig dict for the tiny model at resolution 32.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.infra.processes import free_port, wait_until
from tests.infra.s3 import S3Server

TRAINER = str(Path(sys.executable).parent / "dreambooth-train")


def put_images(s3: S3Server, bucket: str, prefix: str, count: int = 3, size: tuple[int, int] = (48, 40)) -> None:
    client = s3.client()
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        client.put_object(Bucket=bucket, Key=f"{prefix}/img{i}.png", Body=buf.getvalue())


def tiny_job(s3: S3Server, bucket: str, out: str, **training: Any) -> dict[str, Any]:
    return {
        "name": out.replace("/", "-"),
        "namespace": "tests",
        "baseModel": {"tiny": True},
        "instanceImages": {"uri": f"s3://{bucket}/subject", "prompt": "a photo of sks dog", "minResolution": 32},
        "training": {
            "maxSteps": 16,
            "resolution": 32,
            "learningRate": 1e-3,
            "lrSchedule": "cosine",
            "warmupSteps": 2,
            "checkpoint": {"intervalSteps": 4, "intervalSeconds": None, "keep": 2},
            **training,
        },
        "output": {"uri": f"s3://{bucket}/{out}", "formats": ["lora"]},
        "storage": {"endpoint": s3.endpoint, "region": s3.region, "addressingStyle": "path"},
    }


class TrainerRun:
    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        s3_env: dict[str, str],
        *,
        extra_env: dict[str, str] | None = None,
        name: str = "run",
        argv: list[str] | None = None,
    ) -> None:
        """`argv`: the command instead of `dreambooth-train` (e.g. `[python, -c, prelude + run()]`)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.json"
        self.config_path.write_text(json.dumps(config))
        self.termination_path = workdir / f"{name}.termination"
        self.termination_path.unlink(missing_ok=True)
        self.metrics_port = free_port()
        env = {
            **os.environ,
            **s3_env,
            "DREAMBOOTH_CONFIG": str(self.config_path),
            "DREAMBOOTH_WORKDIR": str(workdir / "scratch"),
            "DREAMBOOTH_BIND_ADDRESS": "127.0.0.1",
            "DREAMBOOTH_METRICS_PORT": str(self.metrics_port),
            "DREAMBOOTH_LOG_INTERVAL_SECONDS": "0",
            "TERMINATION_MESSAGE_PATH": str(self.termination_path),
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.events: list[dict[str, Any]] = []
        self.stderr_path = workdir / f"{name}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            argv or [TRAINER], env=env, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self.events.append(event)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == event]

    def _details(self) -> str:
        tail = self.stderr_path.read_text(errors="replace")[-3000:]
        return f"events: {self.events[-5:]}\nstderr tail: {tail}"

    def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 240
    ) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = [e for e in list(self.events) if predicate(e)]
            if not found and self.proc.poll() is not None:
                raise AssertionError(f"trainer exited with {self.proc.returncode} before {what}: {self._details()}")
            return bool(found)

        wait_until(check, what=what, timeout=timeout, interval=0.05, details=self._details)
        return found[0]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._reader.join(timeout=10)
            self._stderr.close()
        return code

    def termination(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.termination_path.read_text())
        return doc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def read_object(s3: S3Server, bucket: str, key: str) -> bytes:
    body: bytes = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def list_keys(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))

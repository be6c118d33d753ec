"""Readiness and liveness probes: ``httpGet``, ``tcpSocket`` and ``exec``, with the kubelet's thresholds."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def resolve_port(port: int | str, container: Mapping[str, Any]) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    raise ValueError(f"container {container.get('name')!r} has no port named {port!r}")


def run_probe(
    probe: Mapping[str, Any], container: Mapping[str, Any], pod_ip: str, env: Mapping[str, str], cwd: Path
) -> bool:
    """One probe attempt; True on success."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "httpGet" in probe:
            spec = probe["httpGet"]
            host = spec.get("host") or pod_ip
            port = resolve_port(spec["port"], container)
            conn: http.client.HTTPConnection
            if str(spec.get("scheme", "HTTP")).upper() == "HTTPS":
                conn = http.client.HTTPSConnection(
                    host,
                    port,
                    timeout=timeout,
                    context=ssl._create_unverified_context(),  # noqa: S323 (kubelet skips verification too)
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
            try:
                conn.request("GET", spec.get("path") or "/", headers=headers)
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        if "tcpSocket" in probe:
            spec = probe["tcpSocket"]
            with socket.create_connection((spec.get("host") or pod_ip, resolve_port(spec["port"], container)), timeout):
                return True
        if "exec" in probe:
            result = subprocess.run(
                probe["exec"]["command"], env=dict(env), cwd=cwd, timeout=timeout, capture_output=True, check=False
            )
            return result.returncode == 0
    except (OSError, ValueError, http.client.HTTPException, subprocess.TimeoutExpired):
        return False
    return False


@dataclass
class ProbeState:
    """Threshold bookkeeping for one probe of one container run."""

    probe: Mapping[str, Any]
    started: float
    success: bool = False
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0

    def __post_init__(self) -> None:
        self.next_at = self.started + float(self.probe.get("initialDelaySeconds") or 0)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, now: float) -> None:
        self.next_at = now + float(self.probe.get("periodSeconds") or 10)
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold") or 1):
                self.success = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= int(self.probe.get("failureThreshold") or 3):
                self.success = False

    @property
    def failed(self) -> bool:
        """The failure threshold is reached (what makes a liveness probe restart the container)."""
        return self.failures >= int(self.probe.get("failureThreshold") or 3)


def monotonic() -> float:
    return time.monotonic()

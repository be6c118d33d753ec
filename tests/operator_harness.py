"""Run the real operator (`dreambooth-operator` console script) as a subprocess against the test cluster.

    install_crds(cluster)
    op = start_operator(cluster, log_dir, namespaces=[ns])
    ...; op.metrics_text(); op.restart(); op.stop()

The operator watches only the given namespaces (so tests never see each other's jobs), runs standalone
(no peering), logs plain text to `<log_dir>/operator-<n>.log`, and reconciles every `interval` seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.infra.controlplane import Cluster
from tests.infra.processes import ManagedProcess, free_ports, http_get, start_process, wait_until

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "crds"
VENV_BIN = Path(sys.executable).parent
_COUNTER = itertools.count()


def install_crds(cluster: Cluster) -> None:
    """Apply the generated CRDs (idempotent) and wait until they are served."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/dreamboothjobs.dreambooth.dev",
        "crd/inferenceservices.dreambooth.dev",
    )


@dataclass
class OperatorProcess:
    cluster: Cluster
    log_dir: Path
    namespaces: list[str]
    env: dict[str, str]
    metrics_port: int = 0
    health_port: int = 0
    process: ManagedProcess | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self) -> OperatorProcess:
        self.metrics_port, self.health_port = free_ports(2)
        args: list[str] = [str(VENV_BIN / "dreambooth-operator"), "--standalone", "--log-format", "plain"]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        args += ["--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port)]
        env = {
            **self.cluster.env(),
            "DREAMBOOTH_OPERATOR_BIND_ADDRESS": "127.0.0.1",
            "DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS": "2",
            "DREAMBOOTH_OPERATOR_TERMINATION_GRACE_SECONDS": "30",
            "PATH": f"{VENV_BIN}{os.pathsep}{self.cluster.env()['PATH']}",
            **self.env,
        }
        self.process = start_process(f"operator-{next(_COUNTER)}", args, log_dir=self.log_dir, env=env)
        self.logs.append(self.process.log_path)
        self.process.wait_ready(self.healthy, what="the operator's liveness endpoint", timeout=60)
        return self

    def healthy(self) -> bool:
        status, _ = http_get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2)
        return status == 200

    def metrics_text(self) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
        assert status == 200, body
        return body

    def log_tail(self) -> str:
        return self.process.log_tail(80) if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=20)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_operator(
    cluster: Cluster, log_dir: Path, namespaces: list[str], env: Mapping[str, str] | None = None
) -> OperatorProcess:
    install_crds(cluster)
    return OperatorProcess(cluster, log_dir, namespaces, dict(env or {})).start()


@contextlib.contextmanager
def running_operator(
    cluster: Cluster, log_dir: Path, namespaces: list[str], env: Mapping[str, str] | None = None
) -> Iterator[OperatorProcess]:
    """The operator for the duration of a `with` block (a test module wraps it in its own fixture)."""
    op = start_operator(cluster, log_dir, namespaces, env)
    try:
        yield op
    finally:
        op.stop()


# --- small helpers for tests ----------------------------------------------------------------------------


def as_manifest(job: Mapping[str, Any]) -> dict[str, Any]:
    """A wrapper-built DreamBoothJob without the server-set fields (uid, generation, status)."""
    doc = json.loads(json.dumps(job))
    for key in ("uid", "generation", "namespace"):
        doc["metadata"].pop(key, None)
    doc.pop("status", None)
    return dict(doc)


def apply(cluster: Cluster, manifest: Mapping[str, Any], namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def get(cluster: Cluster, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def items(cluster: Cluster, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
    args = ["get", kind, "-n", namespace, "-o", "json"]
    if selector:
        args += ["-l", selector]
    return list(json.loads(cluster.kubectl(*args).stdout)["items"])


def wait_for(
    what: str,
    fetch: Callable[[], Any],
    predicate: Callable[[Any], bool],
    timeout: float = 60.0,
    op: OperatorProcess | None = None,
) -> Any:
    """Poll `fetch()` until `predicate` holds; return the last value. The error shows it and the log tail."""
    last: list[Any] = [None]

    def check() -> bool:
        last[0] = fetch()
        return last[0] is not None and bool(predicate(last[0]))

    wait_until(
        check,
        what=what,
        timeout=timeout,
        interval=0.5,
        details=lambda: f"last value: {json.dumps(last[0], default=str)[:3000]}\n" + (op.log_tail() if op else ""),
    )
    return last[0]


def condition(obj: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c.get("type") == type_), None)


def event_reasons(cluster: Cluster, namespace: str, name: str) -> set[str]:
    events = items(cluster, "events", namespace)
    return {e.get("reason") for e in events if (e.get("involvedObject") or {}).get("name") == name}


def elapsed(start: float) -> float:
    return round(time.monotonic() - start, 2)

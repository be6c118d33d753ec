"""Run the real operator (`dreambooth-operator` console script) as a subprocess against the test cluster.

    install_crds(cluster)
    op = start_operator(cluster, log_dir, namespaces=[ns])
    ...; op.metrics_text(); op.restart(); op.stop()

The operator watches only the given namespaces (so tests never see each other's jobs), runs standalone
(no peering), logs plain text to `<log_dir>/operator-<n>.log`, and reconciles every `interval` seconds.

It runs as the Helm chart's ServiceAccount, with the chart's own rendered RBAC (`helm template` with these
namespaces as `watchNamespaces`: its ServiceAccount, discovery ClusterRole and per-namespace Roles, applied for
real) and a token minted for it with the TokenRequest API, so that every test proves the chart grants what the
operator uses. The watched namespaces are labelled `pod-security.kubernetes.io/enforce: restricted`, so the pods it
creates are admitted under Pod Security "restricted". `identity="admin"` runs it as the cluster admin instead.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tests.infra.controlplane import Cluster
from tests.infra.kubeconfig import write_kubeconfig
from tests.infra.paths import ROOT
from tests.infra.processes import ManagedProcess, free_ports, http_get, start_process, tool, wait_until

CRDS = ROOT / "crds"
CHART = ROOT / "charts" / "dreambooth-operator"
VENV_BIN = Path(sys.executable).parent
_COUNTER = itertools.count()
RBAC_KINDS = frozenset({"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})
RESTRICTED = ("pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/warn=restricted")


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
class ChartIdentity:
    """The chart's ServiceAccount and RBAC for the watched namespaces, applied; a kubeconfig with its token."""

    cluster: Cluster
    objects: list[dict[str, Any]]
    kubeconfig: Path
    user: str

    @classmethod
    def install(cls, cluster: Cluster, namespaces: list[str], work_dir: Path) -> ChartIdentity:
        home = namespaces[0]
        release = f"op-{home}"[:53]
        rendered = subprocess.run(
            [
                str(tool("helm")),
                "template",
                release,
                str(CHART),
                "--namespace",
                home,
                f"--set=watchNamespaces={{{','.join(namespaces)}}}",
                "--set=rbac.aggregatedRoles=false",  # cluster-wide, named once: not per test
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert rendered.returncode == 0, rendered.stderr
        # The operator's own objects: not the hooks' (helm test, uninstall), which Helm creates only while they run.
        objects = [
            d
            for d in yaml.safe_load_all(rendered.stdout)
            if d and d.get("kind") in RBAC_KINDS and "helm.sh/hook" not in d["metadata"].get("annotations", {})
        ]
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
        account = next(d for d in objects if d["kind"] == "ServiceAccount")["metadata"]["name"]
        token = cluster.kubectl("create", "token", account, "-n", home, "--duration=4h").stdout.strip()
        user = f"system:serviceaccount:{home}:{account}"
        path = work_dir / f"{release}-{next(_COUNTER)}.kubeconfig"
        return cls(cluster, objects, write_kubeconfig(path, cluster.server, cluster.ca_file, token, user=user), user)

    def remove(self) -> None:
        """The cluster-scoped objects (the namespaced ones go with their namespace)."""
        cluster_scoped = [d for d in self.objects if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
        self.cluster.kubectl(
            "delete",
            "--ignore-not-found",
            "--wait=false",
            "-f",
            "-",
            input=yaml.safe_dump_all(cluster_scoped),
            check=False,
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
    identity: ChartIdentity | None = None
    """The chart's ServiceAccount it runs as (None: the cluster admin)."""

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
            **({"KUBECONFIG": str(self.identity.kubeconfig)} if self.identity else {}),
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

    def close(self) -> None:
        """Stop it and remove the chart's cluster-scoped RBAC objects it ran with."""
        self.stop()
        if self.identity is not None:
            self.identity.remove()

    def restart(self) -> None:
        self.stop()
        self.start()


Identity = Literal["chart", "admin"]


def start_operator(
    cluster: Cluster,
    log_dir: Path,
    namespaces: list[str],
    env: Mapping[str, str] | None = None,
    identity: Identity = "chart",
) -> OperatorProcess:
    """Start the operator on `namespaces`: as the chart's ServiceAccount in namespaces labelled for Pod Security
    "restricted" (module docstring), or as the cluster admin."""
    install_crds(cluster)
    chart = None
    if identity == "chart":
        for ns in namespaces:
            cluster.kubectl("label", "--overwrite", "namespace", ns, *RESTRICTED)
        chart = ChartIdentity.install(cluster, namespaces, log_dir)
    return OperatorProcess(cluster, log_dir, namespaces, dict(env or {}), identity=chart).start()


@contextlib.contextmanager
def running_operator(
    cluster: Cluster,
    log_dir: Path,
    namespaces: list[str],
    env: Mapping[str, str] | None = None,
    identity: Identity = "chart",
) -> Iterator[OperatorProcess]:
    """The operator for the duration of a `with` block (a test module wraps it in its own fixture)."""
    op = start_operator(cluster, log_dir, namespaces, env, identity)
    try:
        yield op
    finally:
        op.close()


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
    return {str(e.get("reason")) for e in events if (e.get("involvedObject") or {}).get("name") == name}


def elapsed(start: float) -> float:
    return round(time.monotonic() - start, 2)

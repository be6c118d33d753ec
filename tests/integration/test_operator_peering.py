"""Two operator replicas with kopf peering (DREAMBOOTH_OPERATOR_PRIORITY=-1, as the chart sets it): one reconciles.

Both watch the same namespace against the real control plane. Each draws its own priority; the lower one pauses,
only the higher one reconciles a new DreamBoothJob (its reconcile counter moves, the other's stays at zero), and
when the active one stops, the other resumes and reconciles the next job.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.controlplane import Cluster
from tests.infra.operator import VENV_BIN, OperatorProcess, apply, as_manifest, get, install_crds, wait_for
from tests.infra.paths import ROOT
from tests.infra.processes import free_ports, start_process
from tests.infra.wrappers import make_job

PEERING_CRDS = ROOT / "charts" / "dreambooth-operator" / "crds" / "kopf.dev_peerings.yaml"
PEERING_NAME = "dreambooth-operator"
# No node matches: the pods stay Pending (no node agent here), the operator still creates the children.
NOWHERE = {"dbo.test/no-such-node": "true"}


class PeeredOperator(OperatorProcess):
    """The harness's operator process without --standalone: it joins the namespace's KopfPeering."""

    def start(self) -> PeeredOperator:
        self.metrics_port, self.health_port = free_ports(2)
        args = [str(VENV_BIN / "dreambooth-operator"), "--log-format", "plain"]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        args += ["--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port)]
        env = {
            **self.cluster.env(),
            "DREAMBOOTH_OPERATOR_BIND_ADDRESS": "127.0.0.1",
            "DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS": "2",
            "DREAMBOOTH_OPERATOR_PEERING_NAME": PEERING_NAME,
            "DREAMBOOTH_OPERATOR_PRIORITY": "-1",
            "PATH": f"{VENV_BIN}{os.pathsep}{self.cluster.env()['PATH']}",
            **self.env,
        }
        self.process = start_process(f"peered-operator-{id(self)}", args, log_dir=self.log_dir, env=env)
        self.logs.append(self.process.log_path)
        self.process.wait_ready(self.healthy, what="the operator's liveness endpoint", timeout=60)
        return self

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs)

    def priority(self) -> int:
        match = re.search(r"configured: .* priority=(\d+)", self.log_text())
        assert match, self.log_tail()
        return int(match.group(1))

    def reconciles(self) -> float:
        match = re.search(r"^dreambooth_operator_reconcile_duration_seconds_count (\S+)$", self.metrics_text(), re.M)
        return float(match.group(1)) if match else 0.0


@pytest.fixture
def pair(cluster: Cluster, namespace: str, infra_log_dir: Path) -> Iterator[list[PeeredOperator]]:
    install_crds(cluster)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(PEERING_CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/kopfpeerings.kopf.dev")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING_NAME}}
    apply(cluster, peering, namespace)
    ops = [PeeredOperator(cluster, infra_log_dir, [namespace], {}) for _ in range(2)]
    try:
        for op in ops:
            op.start()
        yield ops
    finally:
        for op in ops:
            op.stop()


def batch_job(cluster: Cluster, name: str, namespace: str) -> dict[str, object] | None:
    return get(cluster, "job.batch", f"{name}-a0", namespace)


def test_only_the_highest_priority_replica_reconciles_and_the_other_takes_over(
    cluster: Cluster, namespace: str, pair: list[PeeredOperator]
) -> None:
    first, second = pair
    assert first.priority() != second.priority()  # drawn per process (equal with probability ~5e-10)
    active, standby = sorted(pair, key=lambda op: op.priority(), reverse=True)
    wait_for("the lower replica to pause", standby.log_text, lambda t: "Pausing operations in favour of" in t, 60)

    apply(cluster, as_manifest(make_job("one").no_preflight().pod_template(nodeSelector=NOWHERE).obj()), namespace)
    wait_for("the batch Job of one", lambda: batch_job(cluster, "one", namespace), lambda j: True, 60, active)
    wait_for("a reconcile by the active replica", active.reconciles, lambda n: n > 0, 30, active)
    assert standby.reconciles() == 0, standby.log_tail()
    assert "Pausing operations" not in active.log_text()

    assert "Resuming operations" not in standby.log_text()
    active.stop()
    wait_for("the standby to resume", standby.log_text, lambda t: "Resuming operations" in t, 90, standby)
    apply(cluster, as_manifest(make_job("two").no_preflight().pod_template(nodeSelector=NOWHERE).obj()), namespace)
    wait_for("the batch Job of two", lambda: batch_job(cluster, "two", namespace), lambda j: True, 60, standby)
    wait_for("a reconcile by the former standby", standby.reconciles, lambda n: n > 0, 30, standby)

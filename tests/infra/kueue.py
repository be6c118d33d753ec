"""Kueue's controller manager (the real one, built from `sigs.k8s.io/kueue` by build-binaries.sh) on the test
control plane.

    with running_kueue(cluster, work_dir, log_dir) as kueue:
        kueue.apply(manifest)          # ResourceFlavors, ClusterQueues, LocalQueues, ... (webhooks included)
        kueue.workloads(namespace)     # Kueue's Workload objects

What `start_kueue` does, in order:
- installs Kueue's CRDs from the same module version as the binary (`config/components/crd/bases`, copied next to
  the binary by build-binaries.sh), with the conversion webhook that Kueue's kustomization adds, pointed at the
  process by a loopback `url:`;
- writes a serving certificate for 127.0.0.1 signed by a CA of its own (`pki.py`), and a configuration with
  `internalCertManagement` disabled (no cert rotator, no Service), `manageJobsWithoutQueueName: false` and only
  the `batch/job` integration; leader election and the on-demand visibility API server are off;
- starts `kueue --config ...` as the cluster admin and waits for its `/readyz` (true once its webhook server
  listens);
- registers Kueue's admission webhooks from the module's `config/components/webhook/manifests.yaml` (only those of
  Kueue's own kinds and of batch Jobs, the one integration enabled), with loopback `url:` client configs.

With internal certificate management off, Kueue reads its metrics server's certificate from a fixed path,
`/etc/kueue/metrics/certs`. The process gets its own mount namespace with this run's folder bind-mounted there
(the node agent does the same for pod volumes), so concurrent sessions never share it; the host only gets the
empty mount point.

Stopping removes the webhook configurations first: they fail closed, and batch Jobs created after Kueue is gone
(by tests that do not use it) must not be rejected. The CRDs stay, as with a real uninstall.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml
from cryptography.hazmat.primitives import serialization

from tests.infra.controlplane import Cluster
from tests.infra.paths import ROOT
from tests.infra.pki import make_ca, make_serving_cert
from tests.infra.processes import (
    ManagedProcess,
    free_ports,
    http_get,
    retry_on_port_clash,
    start_process,
    tool,
)

STARTUP_TIMEOUT_S: Final = 180.0
NAMESPACE: Final = "kueue-system"
METRICS_CERT_PATH: Final = Path("/etc/kueue/metrics/certs")
"""Where Kueue reads its metrics certificate when internal cert management is off (hard-coded in cmd/kueue)."""
WEBHOOK_CONFIGURATIONS: Final = ("kueue-mutating-webhook-configuration", "kueue-validating-webhook-configuration")
# The CRDs that Kueue's config/components/crd/kustomization.yaml gives a conversion webhook.
CONVERSION_CRDS: Final = frozenset({"localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters"})
# Webhooks registered: Kueue's own kinds, and batch/v1 Jobs (the one integration this configuration enables).
# Every other integration's webhook (pods, deployments, kubeflow, ray, ...) is left out: its kind is not managed
# here, and an unregistered path behind a fail-closed webhook would reject every object of that kind.
WEBHOOK_GROUPS: Final = frozenset({"kueue.x-k8s.io", "batch"})


def kueue_version() -> str:
    """The pinned version (tests/infra/versions.env)."""
    for line in (ROOT / "tests" / "infra" / "versions.env").read_text().splitlines():
        if line.startswith("KUEUE_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("KUEUE_VERSION is not in tests/infra/versions.env")


def config_dir() -> Path:
    """The module's `config/components` files that build-binaries.sh copied next to the binary."""
    binary = tool("kueue").resolve()
    directory = binary.parent / "config"
    if not (directory / "crd").is_dir():
        msg = f"{directory}/crd is missing: run `make binaries` (tests/infra/build-binaries.sh kueue)"
        raise FileNotFoundError(msg)
    return directory


def crd_manifests(url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's CRDs, those with a conversion webhook pointing at `url` + /convert."""
    crds = []
    for path in sorted((config_dir() / "crd").glob("*.yaml")):
        doc: dict[str, Any] = yaml.safe_load(path.read_text())
        if doc["spec"]["names"]["plural"] in CONVERSION_CRDS:
            doc["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{url}/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"],
                },
            }
        crds.append(doc)
    return crds


def webhook_manifests(url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """The module's webhook configurations, named as Kueue's kustomization names them, with loopback URLs."""
    configs = []
    for original in yaml.safe_load_all((config_dir() / "webhook-manifests.yaml").read_text()):
        if not original:
            continue
        doc = copy.deepcopy(original)
        doc["metadata"]["name"] = "kueue-" + doc["metadata"]["name"]
        kept = []
        for hook in doc["webhooks"]:
            if not {g for rule in hook["rules"] for g in rule["apiGroups"]} <= WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": ca_bundle}
            kept.append(hook)
        doc["webhooks"] = kept
        configs.append(doc)
    assert [c["metadata"]["name"] for c in configs] == list(WEBHOOK_CONFIGURATIONS), configs
    return configs


def configuration(*, webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for a loopback process."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        # The visibility API is an aggregated API server of its own (an APIService and its certificates).
        "featureGates": {"VisibilityOnDemand": False},
        "clientConnection": {"qps": 50, "burst": 100},
    }


def _write_cert_pair(directory: Path, ca: Any, ca_key: Any, common_name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = make_serving_cert(ca, ca_key, common_name=common_name, dns_names=["localhost"], ips=["127.0.0.1"])
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "tls.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)


@dataclass
class Kueue:
    """A running Kueue controller manager."""

    cluster: Cluster
    process: ManagedProcess
    webhook_url: str
    health_port: int
    metrics_port: int
    started_in_s: float
    """Seconds from launch to ready (readyz answered and the webhooks registered)."""
    version: str = field(default_factory=kueue_version)

    def ready(self) -> bool:
        status, body = http_get(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2)
        return status == 200 and body.strip() == "ok"

    def apply(self, *manifests: Mapping[str, Any], namespace: str | None = None) -> None:
        """`kubectl apply` Kueue objects (they pass Kueue's webhooks, which must be up)."""
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        self.cluster.kubectl(*args, input=yaml.safe_dump_all([dict(m) for m in manifests]))

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        """Kueue's Workloads in `namespace`."""
        out = self.cluster.kubectl("get", "workloads.kueue.x-k8s.io", "-n", namespace, "-o", "json").stdout
        return list(json.loads(out)["items"])

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines)

    def stop(self) -> None:
        """Unregister the webhooks (they fail closed), then stop the process."""
        self.cluster.kubectl(
            "delete",
            "mutatingwebhookconfiguration,validatingwebhookconfiguration",
            *WEBHOOK_CONFIGURATIONS,
            "--ignore-not-found",
            check=False,
        )
        self.process.stop()


def _mount_namespace_command(metrics_certs: Path, argv: list[str]) -> list[str]:
    """`argv` in a mount namespace of its own, with `metrics_certs` bind-mounted at METRICS_CERT_PATH."""
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if unshare is None or mount is None:
        raise FileNotFoundError("Kueue needs util-linux's unshare and mount (a metrics certificate at a fixed path)")
    METRICS_CERT_PATH.mkdir(parents=True, exist_ok=True)  # the mount point: empty on the host
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", script, "kueue",
            str(metrics_certs), str(METRICS_CERT_PATH), *argv]  # fmt: skip


def start_kueue(cluster: Cluster, work_dir: Path, log_dir: Path, *, timeout: float = STARTUP_TIMEOUT_S) -> Kueue:
    """Install Kueue's CRDs, start the controller manager, register its webhooks; return it once it is ready."""
    binary = tool("kueue")
    work_dir.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca("dbo-test-kueue-ca")
    ca_bundle = base64.b64encode(ca.public_bytes(serialization.Encoding.PEM)).decode()
    _write_cert_pair(work_dir / "webhook-certs", ca, ca_key, "kueue-webhook")
    _write_cert_pair(work_dir / "metrics-certs", ca, ca_key, "kueue-metrics")
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)  # (exists after a restart)

    def attempt() -> Kueue:
        webhook_port, health_port, metrics_port = free_ports(3)
        url = f"https://127.0.0.1:{webhook_port}"
        config_file = work_dir / "config.yaml"
        config_file.write_text(
            yaml.safe_dump(
                configuration(
                    webhook_port=webhook_port,
                    health_port=health_port,
                    metrics_port=metrics_port,
                    cert_dir=work_dir / "webhook-certs",
                )
            )
        )
        began = time.monotonic()
        crds = crd_manifests(url, ca_bundle)
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(crds))
        # Kueue sets up its indexes at start-up: every CRD must be served before it starts.
        names = [f"crd/{c['metadata']['name']}" for c in crds]
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
        argv = [str(binary), f"--config={config_file}", "--zap-log-level=2"]
        process = start_process(
            "kueue",
            _mount_namespace_command(work_dir / "metrics-certs", argv),
            log_dir=log_dir,
            env={"KUBECONFIG": str(cluster.kubeconfig)},
        )
        kueue = Kueue(cluster, process, url, health_port, metrics_port, 0.0)
        try:
            process.wait_ready(kueue.ready, what="Kueue's /readyz", timeout=timeout)
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(webhook_manifests(url, ca_bundle)))
        except BaseException:
            process.stop()
            raise
        kueue.started_in_s = round(time.monotonic() - began, 2)
        return kueue

    return retry_on_port_clash(attempt)


@contextlib.contextmanager
def running_kueue(cluster: Cluster, work_dir: Path, log_dir: Path) -> Iterator[Kueue]:
    """Kueue for the duration of a `with` block (webhooks unregistered and process stopped afterwards)."""
    kueue = start_kueue(cluster, work_dir, log_dir)
    try:
        yield kueue
    finally:
        kueue.stop()

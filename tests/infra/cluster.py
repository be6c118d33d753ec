"""`make cluster` / `make cluster-down`: the whole local stack for trying the operator, in one command.

    python -m tests.infra.cluster up     # stays up until Ctrl-C or `down` (from another terminal)
    python -m tests.infra.cluster down

`up` starts, on loopback with free ports, what the tests use (tests/infra, tests/nodeagent), without pytest:
etcd, kube-apiserver, kube-controller-manager and kube-scheduler; the node agent with three fake GPU nodes (2 GPUs
each) whose pods run as local processes; SeaweedFS S3 with the bucket `dreambooth-examples`, the demo subject's
photos under `subjects/dog/`, and the example Secret `s3-credentials` in the namespace `dreambooth`; Prometheus
scraping the operator, trainer and serving pods (as the chart's ServiceMonitor and PodMonitor select them) with
the chart's alerts loaded; and the operator, installed from charts/dreambooth-operator with `helm install`
(tests/infra/helm.py), watching every namespace.

Everything lives under `.cluster/` (git-ignored; `DBO_CLUSTER_DIR` moves it): `env` (source it: KUBECONFIG with
the namespace `dreambooth` as the default, PATH with kubectl, helm and dreambooth), `kubeconfig`, `examples/`
(the examples with the S3 endpoint filled in, and an InferenceService for the minimal job), `logs/`, and `up.json`
once everything is up. One cluster per folder: `up` refuses to start while another is running there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from tests.infra.controlplane import Cluster, start_cluster
from tests.infra.etcd import start_etcd
from tests.infra.helm import CHART, HelmRelease, local_values
from tests.infra.kubeconfig import kubeconfig
from tests.infra.paths import ROOT, TOOLS_BIN
from tests.infra.processes import ManagedProcess, NotReadyError, stop_all, wait_until
from tests.infra.prometheus import PrometheusServer, start_prometheus
from tests.infra.s3 import S3Server, start_s3
from tests.nodeagent.config import AgentConfig
from tests.nodeagent.plugin import NodeAgent

DIR_ENV = "DBO_CLUSTER_DIR"
NAMESPACE = "dreambooth"
OPERATOR_NAMESPACE = "dreambooth-system"
RELEASE = "dreambooth-operator"
BUCKET = "dreambooth-examples"  # the examples' bucket placeholder (examples/README.md), created for real
ENDPOINT_PLACEHOLDER = "http://s3.example:8333"
RESTRICTED = ["pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/warn=restricted"]
VENV_BIN = Path(sys.executable).parent


def state_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or ROOT / ".cluster").resolve()


class Stop(Exception):  # noqa: N818 (not an error: the way out of `up`)
    """SIGTERM (`make cluster-down`) or SIGINT (Ctrl-C)."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


# ---- the pieces -------------------------------------------------------------------------------------------------
def pod_scrape_config(targets_file: Path) -> dict[str, Any]:
    """The pods the chart's monitors select: every port named `metrics` (the operator's, the trainers'), and the
    serving pods' `http` port (/metrics), with `honor_labels` as the PodMonitor sets. Debian's Prometheus has no
    kubernetes_sd, so `PodTargets` writes the targets for file_sd from the API server's pod list."""
    return {"job_name": "pods", "honor_labels": True, "file_sd_configs": [{"files": [str(targets_file)]}]}


class PodTargets:
    """Keeps a file_sd targets file in step with the running pods' metrics ports (every `interval` seconds)."""

    def __init__(self, cluster: Cluster, path: Path, interval: float = 3.0) -> None:
        self.cluster, self.path, self.interval = cluster, path, interval
        self.stopping = threading.Event()
        self.write()
        self._thread = threading.Thread(target=self._loop, name="pod-targets", daemon=True)
        self._thread.start()

    def targets(self) -> list[dict[str, Any]]:
        from kubernetes import client

        with self.cluster.api_client() as api:
            pods = client.CoreV1Api(api).list_pod_for_all_namespaces(field_selector="status.phase=Running").items
        groups = []
        for pod in pods:
            component = (pod.metadata.labels or {}).get("dreambooth.dev/component")
            names = {"metrics", "http"} if component in ("trainer", "inference") else {"metrics"}
            ports = [p.container_port for c in pod.spec.containers for p in c.ports or [] if p.name in names]
            if pod.status.pod_ip and ports and not pod.metadata.deletion_timestamp:
                labels = {"namespace": pod.metadata.namespace, "pod": pod.metadata.name}
                groups.append({"targets": [f"{pod.status.pod_ip}:{port}" for port in ports], "labels": labels})
        return groups

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.targets(), indent=1))
        tmp.replace(self.path)

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval):
            with contextlib.suppress(Exception):  # the API server going away at shutdown, a pod changing meanwhile
                self.write()

    def stop(self) -> None:
        self.stopping.set()


def user_kubeconfig(cluster: Cluster, path: Path) -> Path:
    """The admin's kubeconfig with context `dreambooth-local` and the namespace `dreambooth` as its default."""
    config = yaml.safe_load(kubeconfig(cluster.server, cluster.ca_file, cluster.admin_token, user="admin"))
    config["contexts"] = [
        {"name": "dreambooth-local", "context": {"cluster": "test", "user": "admin", "namespace": NAMESPACE}}
    ]
    config["current-context"] = "dreambooth-local"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def inference_example() -> dict[str, Any]:
    """An InferenceService serving the minimal job's model on the CPU (the fake GPUs have no CUDA behind them)."""
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "minimal"},
        "spec": {
            "model": {"fromJob": "minimal"},
            "resources": {"gpus": 0},
            "storage": {
                "endpoint": ENDPOINT_PLACEHOLDER,
                "addressingStyle": "path",
                "credentialsSecret": {"name": "s3-credentials"},
            },
        },
    }


def write_examples(folder: Path, s3: S3Server) -> None:
    """The repository's examples with the S3 endpoint placeholder replaced (the bucket exists as named)."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted((ROOT / "examples").glob("*.yaml")):
        (folder / source.name).write_text(source.read_text().replace(ENDPOINT_PLACEHOLDER, s3.endpoint))
    header = (
        "# Serves the model of the DreamBoothJob `minimal` (minimal-job.yaml) on the CPU; written by make cluster.\n"
    )
    body = yaml.safe_dump(inference_example(), sort_keys=False).replace(ENDPOINT_PLACEHOLDER, s3.endpoint)
    (folder / "inference-minimal.yaml").write_text(header + body)


def stock_bucket(s3: S3Server, work: Path) -> None:
    """The examples' bucket with the demo subject's photos where minimal-job.yaml looks for them."""
    from dreambooth_cli import subject

    s3.wait_ready()
    s3.make_bucket(BUCKET)
    client = s3.client()
    for path in subject.write_subject(work / "subject", size=64, count=6):
        client.upload_file(str(path), BUCKET, f"subjects/dog/{path.name}")


def example_secret(cluster: Cluster, s3: S3Server) -> None:
    """examples/s3-credentials-secret.yaml with the server's keys, in the default namespace."""
    text = (ROOT / "examples" / "s3-credentials-secret.yaml").read_text()
    doc = yaml.safe_load(text)
    doc["stringData"] = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(doc))


class _Background:
    """Run a function in a thread; `result()` re-raises its exception."""

    def __init__(self, target: Any, *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target, *args), daemon=True)
        self._thread.start()

    def _run(self, target: Any, *args: Any) -> None:
        try:
            self._value = target(*args)
        except BaseException as exc:
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


# ---- up / down ----------------------------------------------------------------------------------------------------
def running_pid(root: Path) -> int | None:
    """The pid of the `up` that owns `root`, if it still runs."""
    try:
        pid = int((root / "up.pid").read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


@contextlib.contextmanager
def _owned(root: Path) -> Iterator[None]:
    other = running_pid(root)
    if other is not None:
        raise SystemExit(f"a cluster is already running in {root} (pid {other}): `make cluster-down` stops it")
    for child in ("control-plane", "node-agent", "s3", "prometheus", "examples", "images", "logs", "up.json", "env"):
        path = root / child
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "up.pid").write_text(str(os.getpid()))
    try:
        yield
    finally:
        (root / "up.json").unlink(missing_ok=True)
        (root / "up.pid").unlink(missing_ok=True)


def up(root: Path) -> int:
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    started = time.monotonic()
    procs: list[ManagedProcess] = []
    agent: NodeAgent | None = None
    s3: S3Server | None = None
    prometheus: PrometheusServer | None = None
    pod_targets: PodTargets | None = None
    logs = root / "logs"
    with _owned(root):
        try:
            print(f"Starting the local cluster in {root} (logs: {logs}) ...", flush=True)
            etcd = start_etcd(root / "control-plane" / "etcd", logs)  # these two start in parallel
            s3 = start_s3(root / "s3", logs)
            cluster = start_cluster(root / "control-plane", logs, procs, etcd=etcd)
            stocked = _Background(stock_bucket, s3, root / "s3")
            agent = NodeAgent(
                AgentConfig(
                    kubeconfig=str(cluster.kubeconfig),
                    state_dir=str(root / "node-agent"),
                    parent_pid=os.getpid(),
                ),
                logs / "node-agent.log",
            ).start()
            release = HelmRelease(cluster.kubeconfig, RELEASE, OPERATOR_NAMESPACE)
            installed = _Background(release.install, local_values(reconcile_seconds=3))
            cluster.kubectl("create", "namespace", NAMESPACE)
            cluster.kubectl("label", "namespace", NAMESPACE, *RESTRICTED)
            (root / "prometheus").mkdir(parents=True, exist_ok=True)
            pod_targets = PodTargets(cluster, root / "prometheus" / "pods.json")
            prometheus = start_prometheus(
                root / "prometheus",
                logs,
                scrape_configs=[pod_scrape_config(pod_targets.path)],
                rule_files=[CHART / "files" / "alerts.yaml"],  # the chart's alerts (its PrometheusRule's rules)
                scrape_interval="5s",
                evaluation_interval="5s",
            )
            stocked.result()
            example_secret(cluster, s3)
            write_examples(root / "examples", s3)
            config = user_kubeconfig(cluster, root / "kubeconfig")
            env = root / "env"
            env.write_text(
                f"export KUBECONFIG={config}\nexport PATH={TOOLS_BIN}:{VENV_BIN}:$PATH\n"
                f"# S3 (the examples' endpoint and the Secret's keys), for the aws CLI or boto3:\n"
                f"export AWS_ENDPOINT_URL={s3.endpoint} AWS_ACCESS_KEY_ID={s3.access_key}"
                f" AWS_SECRET_ACCESS_KEY={s3.secret_key} AWS_DEFAULT_REGION={s3.region}\n"
            )
            installed.result()
            seconds = time.monotonic() - started
            info = {
                "seconds": round(seconds, 1),
                "kubeconfig": str(config),
                "env": str(env),
                "apiServer": cluster.server,
                "s3": s3.endpoint,
                "prometheus": prometheus.url,
                "namespace": NAMESPACE,
                "operator": f"{OPERATOR_NAMESPACE}/{RELEASE}",
                "pid": os.getpid(),
            }
            (root / "up.json").write_text(json.dumps(info, indent=1))
            print(banner(info, root), flush=True)
            while True:  # until SIGINT / SIGTERM; the agent dying is worth saying
                time.sleep(1)
                agent.check()
        except Stop as stop:
            print(f"\n{stop}: stopping the local cluster ...", flush=True)
        except NotReadyError as err:
            print(f"make cluster failed: {err}\n(logs in {logs})", file=sys.stderr, flush=True)
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if agent is not None:
                agent.stop()  # pods get SIGTERM; the fake nodes and the /etc/hosts block go
            if pod_targets is not None:
                pod_targets.stop()
            if prometheus is not None:
                prometheus.stop()
            if s3 is not None:
                s3.stop()
            stop_all(procs)
            for child in ("control-plane", "node-agent", "s3", "prometheus"):
                shutil.rmtree(root / child, ignore_errors=True)
    print("stopped.", flush=True)
    return 0


def banner(info: dict[str, Any], root: Path) -> str:
    rel = os.path.relpath(root, Path.cwd()) if root.is_relative_to(Path.cwd()) else str(root)
    return f"""
The local cluster is up ({info["seconds"]:.0f}s): the operator ({info["operator"]}, from the Helm chart) watches
every namespace; 3 fake GPU nodes run pods as local processes; S3 at {info["s3"]} (bucket {BUCKET}); Prometheus at
{info["prometheus"]}. In another terminal:

  source {rel}/env        # export KUBECONFIG={info["kubeconfig"]}, and PATH
  kubectl apply -f {rel}/examples/minimal-job.yaml
  kubectl get dbj
  dreambooth watch minimal

The default namespace is {NAMESPACE} (the Secret s3-credentials is there). Stop with Ctrl-C here, or: make cluster-down
"""


def down(root: Path, timeout: float = 120.0) -> int:
    pid = running_pid(root)
    if pid is None:
        print(f"no cluster is running in {root}")
        return 0
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: running_pid(root) is None, what=f"make cluster (pid {pid}) to stop", timeout=timeout)
    except NotReadyError:
        os.kill(pid, signal.SIGKILL)  # its servers die with it (PR_SET_PDEATHSIG)
        print(f"make cluster (pid {pid}) did not stop in {timeout:.0f}s: killed", file=sys.stderr)
        return 1
    print("the local cluster is stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.infra.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args(argv)
    root = state_dir()
    return up(root) if args.command == "up" else down(root)


if __name__ == "__main__":
    sys.exit(main())

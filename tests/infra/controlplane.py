"""The test control plane: etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback.

`start_cluster(work_dir, log_dir)` returns a ready `Cluster`: RBAC is on, the admin token is in
`system:masters`, the restricted token has no bindings, and the controllers that the operator relies on
(jobs, replicasets, deployments, garbage collection, namespaces, service accounts) are running.
There are no nodes: pods stay Pending until the test node agent (tests/nodeagent) registers some.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.infra.etcd import Etcd, start_etcd
from tests.infra.kubeconfig import TokenUser, token_auth_file, write_kubeconfig
from tests.infra.pki import ControlPlanePki, write_control_plane_pki
from tests.infra.processes import (
    TOOLS_BIN,
    ManagedProcess,
    ProcessExitedError,
    free_port,
    http_get,
    is_port_clash,
    start_process,
    stop_all,
    tool,
    wait_until,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

STARTUP_TIMEOUT_S = 180.0
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

# The audit log (tests/e2e/test_rbac_audit.py compares the operator's requests with the chart's RBAC): request
# metadata only, without the RequestReceived stage, and only of ServiceAccounts outside kube-system (the
# controllers' own accounts would be most of the volume). JSON lines.
AUDIT_LOG_NAME = "kube-apiserver-audit.jsonl"
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    userGroups: ["system:serviceaccounts:kube-system"]
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""

ADMIN_USER = "dbo-admin"
RESTRICTED_USER = "dbo-restricted"

# The controllers the operator and its tests depend on; the rest (node lifecycle, volumes, cloud, ...) would
# only cost CPU, and node-lifecycle would fight the fake nodes of the node agent.
CONTROLLERS = (
    "job-controller",
    "replicaset-controller",
    "deployment-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "endpointslice-controller",
    "pod-garbage-collector-controller",
    "disruption-controller",
    "ttl-after-finished-controller",
)


@dataclass
class Cluster:
    """A running test control plane. Use `kubectl(...)` or `api_client()`; both act as the admin.

    Attributes:
        server: the kube-apiserver URL (https://127.0.0.1:<port>).
        kubeconfig: admin kubeconfig (user `dbo-admin`, group `system:masters`).
        restricted_kubeconfig: kubeconfig of `dbo-restricted`, a user with no RBAC bindings.
        admin_token / restricted_token: their bearer tokens.
        ca_file: the CA that signed the apiserver serving certificate.
        log_dir: where every server logs (`<name>.log`).
        version: the server's gitVersion, e.g. "v1.36.3".
        audit_log: the apiserver's audit log (JSON lines, AUDIT_POLICY), in `log_dir`.
    """

    server: str
    kubeconfig: Path
    restricted_kubeconfig: Path
    admin_token: str
    restricted_token: str
    ca_file: Path
    log_dir: Path
    pki: ControlPlanePki
    etcd: Etcd
    processes: list[ManagedProcess] = field(default_factory=list)
    admin_user: str = ADMIN_USER
    restricted_user: str = RESTRICTED_USER
    service_cluster_ip_range: str = SERVICE_CLUSTER_IP_RANGE
    audit_log: Path | None = None

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `kubectl --kubeconfig <admin or given> *args`; text output; raise on failure when `check`.

        The raised `subprocess.CalledProcessError` message includes stdout and stderr.
        """
        argv = [str(tool("kubectl")), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        env = {**os.environ, "PATH": f"{TOOLS_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, check=False, timeout=timeout, env=env
        )
        if check and result.returncode != 0:
            raise KubectlError(result)
        return result

    def configuration(self, token: str | None = None) -> Any:
        """A `kubernetes.client.Configuration` for this server (admin token unless `token` is given)."""
        from kubernetes import client

        config = client.Configuration()
        config.host = self.server
        config.ssl_ca_cert = str(self.ca_file)
        config.verify_ssl = True
        config.api_key = {"authorization": f"Bearer {token or self.admin_token}"}
        return config

    def api_client(self, token: str | None = None) -> ApiClient:
        """A new `kubernetes.client.ApiClient` acting as the admin (or as the owner of `token`)."""
        from kubernetes import client

        return client.ApiClient(self.configuration(token))

    def env(self) -> dict[str, str]:
        """Environment for subprocesses that talk to this cluster (KUBECONFIG, PATH with .tools/bin)."""
        return {"KUBECONFIG": str(self.kubeconfig), "PATH": f"{TOOLS_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def readyz(self) -> bool:
        """True when the apiserver's /readyz says ok."""
        return _readyz(self.server, self.admin_token)

    def create_namespace(self, prefix: str = "t", *, timeout: float = 120.0) -> str:
        """Create a namespace with a unique name and wait for its `default` ServiceAccount; return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", name)

        def has_default_sa() -> bool:
            result = self.kubectl("get", "serviceaccount", "default", "-n", name, "-o", "name", check=False)
            return result.returncode == 0

        wait_until(has_default_sa, what=f"ServiceAccount default in namespace {name}", timeout=timeout)
        return name

    def delete_namespace(self, name: str, *, wait: bool = False) -> None:
        """Delete a namespace (and optionally wait until it is gone)."""
        self.kubectl("delete", "namespace", name, "--ignore-not-found", f"--wait={str(wait).lower()}", "--timeout=120s")

    def stop(self) -> None:
        stop_all(self.processes)

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver alone (SIGTERM, SIGKILL after 10 s), as an upgrade or a crash of the control plane
        would; etcd, the controllers and the scheduler keep running (tests/chaos/test_chaos_apiserver.py)."""
        self._apiserver().stop()

    def start_apiserver(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start kube-apiserver again after `stop_apiserver`, with the same command line (port, etcd, flags), so
        that every kubeconfig and client reaches it as before; return once /readyz says ok."""
        old = self._apiserver()
        new = start_process(old.name, old.args, log_dir=old.log_path.parent)
        self.processes[self.processes.index(old)] = new
        new.wait_ready(self.readyz, what="kube-apiserver to become ready again", timeout=timeout)

    def _apiserver(self) -> ManagedProcess:
        return next(p for p in self.processes if p.name == "kube-apiserver")


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; `str()` shows the command, exit code, stdout and stderr."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(result.returncode, result.args, result.stdout, result.stderr)

    def __str__(self) -> str:
        cmd = " ".join(str(a) for a in self.cmd)
        return f"{cmd} exited with {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def apiserver_args(
    *,
    etcd_url: str,
    port: int,
    pki: ControlPlanePki,
    token_file: Path,
    cert_dir: Path,
    audit_policy: Path | None = None,
    audit_log: Path | None = None,
) -> list[str]:
    """kube-apiserver flags for a loopback test server with RBAC and static tokens (and an audit log if given)."""
    audit = (
        [f"--audit-policy-file={audit_policy}", f"--audit-log-path={audit_log}", "--audit-log-format=json"]
        if audit_policy and audit_log
        else []
    )
    return [
        *audit,
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        f"--requestheader-client-ca-file={pki.front_proxy_ca_cert}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client_cert}",
        f"--proxy-client-key-file={pki.front_proxy_client_key}",
        "--authorization-mode=Node,RBAC",
        f"--token-auth-file={token_file}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.sa_public_key}",
        f"--service-account-signing-key-file={pki.sa_private_key}",
        f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        # The node agent serves the kubelet API (logs) on the node's InternalIP (127.0.0.x).
        "--kubelet-preferred-address-types=InternalIP",
        "--allow-privileged=true",
        # The `kubernetes` Endpoints would hold 127.0.0.1, which Endpoints validation rejects: skip them.
        "--endpoint-reconciler-type=none",
        # One client (the tests) and 2 shared cores: fairness queuing only costs CPU here.
        "--enable-priority-and-fairness=false",
        "--profiling=false",
        "--event-ttl=1h",
        "--v=1",
    ]


def controller_manager_args(*, kubeconfig: Path, port: int, pki: ControlPlanePki, cert_dir: Path) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
        f"--controllers={','.join(CONTROLLERS)}",
        # Each controller acts as its own ServiceAccount, as in kubeadm clusters (so RBAC bugs show up here).
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.sa_private_key}",
        f"--root-ca-file={pki.ca_cert}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        # React quickly: tests wait on garbage collection and pod cleanup.
        "--terminated-pod-gc-threshold=100",
        "--profiling=false",
        "--v=1",
    ]


def scheduler_args(*, kubeconfig: Path, port: int, cert_dir: Path) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def _healthz(port: int) -> bool:
    status, body = http_get(f"https://127.0.0.1:{port}/healthz", insecure=True, timeout=3.0)
    return status == 200 and body.strip() == "ok"


@contextlib.contextmanager
def running_cluster(work_dir: Path, log_dir: Path, *, timeout: float = STARTUP_TIMEOUT_S) -> Iterator[Cluster]:
    """Start the control plane, yield it when ready, stop it afterwards (also when start-up fails)."""
    procs: list[ManagedProcess] = []
    try:
        cluster = start_cluster(work_dir, log_dir, procs, timeout)
        yield cluster
    finally:
        stop_all(procs)


def start_cluster(
    work_dir: Path,
    log_dir: Path,
    procs: list[ManagedProcess],
    timeout: float = STARTUP_TIMEOUT_S,
    *,
    etcd: Etcd | None = None,
) -> Cluster:
    """Start the control plane and return it when ready.

    Every process started is appended to `procs` as soon as it starts, so the caller can stop them all even
    when start-up fails half-way (`running_cluster` does that for you). `etcd` may be one started earlier
    (not necessarily ready yet) by `start_etcd`.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    if etcd is None:
        etcd = start_etcd(work_dir / "etcd", log_dir)
    # Key generation overlaps with etcd start-up.
    pki = write_control_plane_pki(work_dir / "pki", service_ip=KUBERNETES_SERVICE_IP)
    admin = TokenUser.new(ADMIN_USER, ("system:masters",))
    restricted = TokenUser.new(RESTRICTED_USER)
    kcm_user = TokenUser.new("system:kube-controller-manager")
    sched_user = TokenUser.new("system:kube-scheduler")
    token_file = work_dir / "tokens.csv"
    token_file.write_text(token_auth_file([admin, restricted, kcm_user, sched_user]))
    token_file.chmod(0o600)
    audit_policy = work_dir / "audit-policy.yaml"
    audit_policy.write_text(AUDIT_POLICY)
    audit_log = log_dir / AUDIT_LOG_NAME
    try:
        etcd.wait_ready(timeout)
    finally:
        procs.append(etcd.process)  # (possibly a restarted one)

    apiserver = _Component(
        "kube-apiserver",
        lambda port: [
            str(tool("kube-apiserver")),
            *apiserver_args(
                etcd_url=etcd.client_url,
                port=port,
                pki=pki,
                token_file=token_file,
                cert_dir=work_dir / "apiserver-certs",
                audit_policy=audit_policy,
                audit_log=audit_log,
            ),
        ],
        lambda port: _readyz(f"https://127.0.0.1:{port}", admin.token),
        procs,
        log_dir,
    )
    apiserver.launch()
    apiserver.wait(timeout)
    server = f"https://127.0.0.1:{apiserver.port}"
    cluster = Cluster(
        server=server,
        kubeconfig=write_kubeconfig(work_dir / "admin.kubeconfig", server, pki.ca_cert, admin.token, user=admin.name),
        restricted_kubeconfig=write_kubeconfig(
            work_dir / "restricted.kubeconfig", server, pki.ca_cert, restricted.token, user=restricted.name
        ),
        admin_token=admin.token,
        restricted_token=restricted.token,
        ca_file=pki.ca_cert,
        log_dir=log_dir,
        pki=pki,
        etcd=etcd,
        processes=procs,
        audit_log=audit_log,
    )

    kcm_config = write_kubeconfig(work_dir / "kcm.kubeconfig", server, pki.ca_cert, kcm_user.token, user=kcm_user.name)
    sched_config = write_kubeconfig(
        work_dir / "scheduler.kubeconfig", server, pki.ca_cert, sched_user.token, user=sched_user.name
    )
    kcm = _Component(
        "kube-controller-manager",
        lambda port: [
            str(tool("kube-controller-manager")),
            *controller_manager_args(kubeconfig=kcm_config, port=port, pki=pki, cert_dir=work_dir / "kcm-certs"),
        ],
        _healthz,
        procs,
        log_dir,
    )
    scheduler = _Component(
        "kube-scheduler",
        lambda port: [
            str(tool("kube-scheduler")),
            *scheduler_args(kubeconfig=sched_config, port=port, cert_dir=work_dir / "sched-certs"),
        ],
        _healthz,
        procs,
        log_dir,
    )
    # Both are launched before either is waited for, so they start up in parallel.
    kcm.launch()
    scheduler.launch()
    kcm.wait(timeout)
    scheduler.wait(timeout)

    # The serviceaccount controller works: pods can be created in `default`.
    def default_sa() -> bool:
        return cluster.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

    kcm.process.wait_ready(
        default_sa, what="ServiceAccount default/default (serviceaccount controller)", timeout=timeout
    )
    return cluster


class _Component:
    """One server on one free port: launch it, wait for `ready(port)`, relaunch on a new port after a clash."""

    def __init__(
        self,
        name: str,
        command: Callable[[int], list[str]],
        ready: Callable[[int], bool],
        procs: list[ManagedProcess],
        log_dir: Path,
    ) -> None:
        self.name, self.command, self.ready, self.procs, self.log_dir = name, command, ready, procs, log_dir
        self.port = 0
        self._process: ManagedProcess | None = None

    @property
    def process(self) -> ManagedProcess:
        assert self._process is not None, f"{self.name} was not launched"
        return self._process

    def launch(self) -> None:
        self.port = free_port()
        self._process = start_process(self.name, self.command(self.port), log_dir=self.log_dir)
        self.procs.append(self._process)

    def wait(self, timeout: float, attempts: int = 3) -> None:
        for remaining in range(attempts - 1, -1, -1):
            try:
                self.process.wait_ready(
                    functools.partial(self.ready, self.port),
                    what=f"{self.name} on port {self.port} to become ready",
                    timeout=timeout,
                )
                return
            except ProcessExitedError as err:
                if remaining == 0 or not is_port_clash(err):
                    raise
                self.procs.remove(self.process)
                self.process.stop()
                self.launch()


def _readyz(server: str, token: str) -> bool:
    status, body = http_get(f"{server}/readyz", headers={"Authorization": f"Bearer {token}"}, insecure=True)
    return status == 200 and body.strip() == "ok"

"""The node agent: fake nodes, a pod watch, and one worker per pod bound to those nodes.

It runs as a child process of pytest (``python -m nodeagent``, started by the ``node_agent`` fixture), not as a
thread in the test process, because:
- pytest also runs the operator (kopf) and the tests; the agent's many threads (pod workers, log pumps, log
  servers, heartbeats) would compete with them for one GIL on a 2-core machine shared with other sessions;
- a crash or hang in the agent cannot take the test process down, and the fixture can always end it with a
  signal; it exits by itself when its parent dies (``parent_pid``);
- it behaves like a kubelet: a separate program that talks only to the apiserver; the tests see it only through
  the API, the files under its state folder (logs), and its own log file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .certs import write_self_signed
from .config import AgentConfig
from .envresolve import ObjectSource
from .hostsfile import HostsFile, PodHost, render_view, write_in_place
from .ipalloc import IPAllocator, claim_subnet
from .kube import MERGE, ApiException, Kube
from .logserver import LogServer
from .podstatus import LOST_MESSAGE, ContainerRecord, container_status, lost
from .runtime import bind_mounts_supported, private_hosts_supported
from .worker import PodWorker, final_delete, pod_path

log = logging.getLogger(__name__)

HOST_IP = "127.0.0.1"
KUBELET_VERSION = "v1.36.0-nodeagent"


def _micro_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _ApiSource(ObjectSource):
    """ConfigMaps and Secrets read from the API at container start (what the kubelet does)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def config_map(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.kube.get_or_none(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def secret(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.kube.get_or_none(f"/api/v1/namespaces/{namespace}/secrets/{name}")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.root = config.state_path
        self.root.mkdir(parents=True, exist_ok=True)
        self.kube = Kube(Path(config.kubeconfig))
        self.source = _ApiSource(self.kube)
        self.host_ip = HOST_IP
        self.agent_id = f"nodeagent-{uuid.uuid4().hex[:8]}"
        self._claim = claim_subnet()
        self._ips = IPAllocator(self._claim.second_octet)
        self._hosts = HostsFile(self.agent_id, Path(config.hosts_file)) if config.hosts_file else None
        self._pod_hosts: dict[str, PodHost] = {}
        self._views_dir = self.root / "hosts"
        self._private_hosts = False
        self.mounts_supported = False
        # Where pods find the API server (in-cluster config reads KUBERNETES_SERVICE_HOST/PORT): the server of the
        # agent's own kubeconfig, as kube-proxy would route the `kubernetes` Service's ClusterIP to it.
        api = urlsplit(self.kube.api.configuration.host)
        self.api_host, self.api_port = api.hostname or "127.0.0.1", str(api.port or 443)
        self._lock = threading.RLock()
        self._workers: dict[str, PodWorker] = {}
        self._finished: set[str] = set()
        self._active_nodes: set[str] = set()
        self._servers: dict[str, LogServer] = {}
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._registered_at = _now()  # node conditions never change, so they have one transition time

    # ---- WorkerContext ---------------------------------------------------------------------------------------
    def allocate_ip(self) -> str:
        with self._lock:
            return self._ips.allocate()

    def release_ip(self, ip: str) -> None:
        with self._lock:
            self._ips.release(ip)

    def add_pod_host(self, uid: str, host: PodHost) -> Path | None:
        """Publish a pod's names; returns the hosts view for its namespace (None: use the machine's file)."""
        with self._lock:
            self._pod_hosts[uid] = host
            self._write_hosts()
            return self._views_dir / host.namespace if self._private_hosts else None

    def remove_pod_host(self, uid: str) -> None:
        with self._lock:
            if self._pod_hosts.pop(uid, None) is not None:
                self._write_hosts()

    def _write_hosts(self) -> None:
        if self._hosts is None:
            return
        entries: dict[str, list[str]] = {}
        for host in self._pod_hosts.values():
            entries.setdefault(host.ip, []).extend(host.names())
        if self._private_hosts:
            machine = self._hosts.path.read_text()
            namespaces = {h.namespace for h in self._pod_hosts.values()} | {
                p.name for p in self._views_dir.iterdir() if not p.name.startswith(".")
            }
            for namespace in namespaces:
                write_in_place(self._views_dir / namespace, render_view(machine, self._pod_hosts.values(), namespace))
        try:
            shadowed = self._hosts.write(entries)
        except OSError as exc:  # not root, read-only /etc: pods still run, only hostnames do not resolve
            log.warning("cannot update %s (%s); pod hostnames will not resolve", self._hosts.path, exc)
            return
        if shadowed:
            log.warning("another live node agent maps %s too; the first block in the file wins", sorted(shadowed))

    def process_env(self, pod: Mapping[str, Any]) -> dict[str, str]:
        """The host part of a container's environment (the pod's own env is applied over it)."""
        env = {k: os.environ[k] for k in self.config.host_env_keys if k in os.environ}
        env["HOSTNAME"] = pod["spec"].get("hostname") or pod["metadata"]["name"]
        # The kubelet gives every pod the `kubernetes` Service's address (only these three: nothing reads the rest).
        env["KUBERNETES_SERVICE_HOST"] = self.api_host
        env["KUBERNETES_SERVICE_PORT"] = env["KUBERNETES_SERVICE_PORT_HTTPS"] = self.api_port
        env["PYTHONUNBUFFERED"] = "1"  # a pipe makes Python buffer stdout; tests read logs while pods run
        if self.config.omp_num_threads is not None:
            env["OMP_NUM_THREADS"] = self.config.omp_num_threads
        if self.config.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.config.cuda_visible_devices
        meta = pod["metadata"]
        env["TMPDIR"] = str(self.root / "pods" / meta["namespace"] / meta["name"] / meta["uid"] / "tmp")
        env.update(self.config.extra_env)
        return env

    def allocatable(self) -> Mapping[str, str]:
        return self.config.capacity

    def image_entrypoints(self) -> Mapping[str, list[str]]:
        return self.config.image_entrypoints

    def backoff(self, restarts: int) -> float:
        return float(min(self.config.backoff_seconds * 2 ** max(0, restarts - 1), self.config.max_backoff_seconds))

    def worker_done(self, uid: str) -> None:
        with self._lock:
            self._workers.pop(uid, None)
            self._finished.add(uid)

    # ---- nodes -----------------------------------------------------------------------------------------------
    def _node_status(self, name: str) -> dict[str, Any]:
        now = _now()
        since = self._registered_at

        def cond(ctype: str, status: str, reason: str, message: str) -> dict[str, str]:
            return {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": since,
            }

        return {
            "capacity": dict(self.config.capacity),
            "allocatable": dict(self.config.capacity),
            "conditions": [
                cond(
                    "MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"
                ),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "test node agent is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self._servers[name].port}},
            "nodeInfo": {
                "machineID": self.agent_id,
                "systemUUID": name,
                "bootID": self.agent_id,
                "kernelVersion": os.uname().release,
                "osImage": "dreambooth-operator test node agent",
                "containerRuntimeVersion": "nodeagent://1",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def _register(self, name: str) -> None:
        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "dreambooth-operator.test/node-agent": self.agent_id,
            **self.config.labels,
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": self.config.taints} if self.config.taints else {},
            "status": self._node_status(name),
        }
        try:
            self.kube.create("/api/v1/nodes", body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        # The TaintNodesByCondition admission plugin adds node.kubernetes.io/not-ready:NoSchedule to every new
        # Node; the node-lifecycle controller would lift it, but the test control plane does not run that
        # controller (it would fight the fake nodes). The node is Ready, so set exactly the configured taints.
        spec_patch = {"metadata": {"labels": labels}, "spec": {"taints": self.config.taints or None}}
        self.kube.patch(f"/api/v1/nodes/{name}", spec_patch, MERGE)
        self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": self._node_status(name)})
        self._renew_lease(name)
        log.info("registered node %s (kubelet port %d)", name, self._servers[name].port)

    def _renew_lease(self, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        renew = _micro_time(datetime.now(UTC))
        try:
            self.kube.patch(path, {"spec": {"holderIdentity": name, "renewTime": renew}}, MERGE)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.kube.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name, "namespace": "kube-node-lease"},
                    "spec": {
                        "holderIdentity": name,
                        "leaseDurationSeconds": self.config.lease_duration_seconds,
                        "renewTime": renew,
                    },
                },
            )

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.config.heartbeat_seconds):
            if self.config.parent_pid is not None and os.getppid() != self.config.parent_pid:
                log.warning("parent process %d is gone; stopping", self.config.parent_pid)
                threading.Thread(target=self.stop, daemon=True).start()
                return
            for name in list(self._active_nodes):
                try:
                    self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": self._node_status(name)})
                    self._renew_lease(name)
                except ApiException as exc:
                    if exc.status == 404:
                        self._node_gone(name)
                    else:
                        log.warning("heartbeat of %s failed: %s", name, exc.status)
                except Exception:
                    log.exception("heartbeat of %s failed", name)

    def _node_gone(self, name: str) -> None:
        """The Node was deleted (a test simulating a lost machine): shut its pods down and stop serving it."""
        log.warning("node %s was deleted; shutting its pods down", name)
        with self._lock:
            self._active_nodes.discard(name)
            workers = [w for w in self._workers.values() if w.node == name]
        for worker in workers:
            worker.shutdown()

    # ---- pods ------------------------------------------------------------------------------------------------
    def _pod_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.kube.get("/api/v1/pods")
                version = listing["metadata"]["resourceVersion"]
                present = set()
                for pod in listing.get("items", []):
                    present.add(pod["metadata"]["uid"])
                    self._dispatch(pod)
                with self._lock:
                    vanished = [w for uid, w in self._workers.items() if uid not in present]
                for worker in vanished:
                    worker.deleted()
                while not self.stopping.is_set():
                    for event in self.kube.watch("/api/v1/pods", version, timeout_seconds=20):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise _RelistError(str(obj.get("message")))
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] == "DELETED":
                            self._deleted(obj)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self._dispatch(obj)
                        if self.stopping.is_set():
                            return
            except _RelistError as exc:
                log.info("pod watch expired (%s); listing again", exc)
            except Exception:
                if self.stopping.is_set():
                    return
                log.exception("pod watch failed; listing again in 1s")
                self.stopping.wait(1.0)

    def _dispatch(self, pod: dict[str, Any]) -> None:
        node = pod.get("spec", {}).get("nodeName")
        if not node or node not in self._active_nodes or self.stopping.is_set():
            return
        uid = pod["metadata"]["uid"]
        status = pod.get("status") or {}
        terminal = status.get("phase") in ("Succeeded", "Failed")
        with self._lock:
            worker = self._workers.get(uid)
            if worker is not None:
                worker.update(pod)
                return
            known = uid in self._finished
            self._finished.add(uid)
            if not known and not terminal and not status.get("startTime"):
                worker = PodWorker(self, pod, self.config.shutdown_grace_seconds)
                self._workers[uid] = worker
                self._finished.discard(uid)
        if worker is not None:
            worker.start()
        elif terminal and pod["metadata"].get("deletionTimestamp"):
            final_delete(self.kube, pod)  # a finished pod being deleted: only the final DELETE is left to do
        elif not known and not terminal:
            # Started by an earlier agent whose processes are gone: report it lost, as the kubelet does.
            threading.Thread(target=self._fail_lost, args=(pod,), daemon=True).start()

    def _deleted(self, pod: dict[str, Any]) -> None:
        with self._lock:
            worker = self._workers.get(pod["metadata"]["uid"])
        if worker is not None:
            worker.deleted()

    def _fail_lost(self, pod: dict[str, Any]) -> None:
        now = datetime.now(UTC)
        containers = pod["spec"]["containers"]
        statuses = [container_status(ContainerRecord(c["name"], c.get("image", ""), lost(now))) for c in containers]
        status = {
            "phase": "Failed",
            "reason": "NodeAgentRestarted",
            "message": LOST_MESSAGE,
            "containerStatuses": statuses,
        }
        try:
            self.kube.patch(pod_path(pod, "/status"), {"status": status})
            if pod["metadata"].get("deletionTimestamp"):
                final_delete(self.kube, pod)
        except ApiException as exc:
            log.warning("could not fail lost pod %s: %s", pod["metadata"]["name"], exc.status)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        cert, key = self.root / "kubelet.crt", self.root / "kubelet.key"
        write_self_signed(cert, key)
        for name in self.config.nodes:
            server = LogServer(self.root, cert, key)
            server.start()
            self._servers[name] = server
        if self._hosts is not None and self.config.private_hosts:
            self._views_dir.mkdir(exist_ok=True)
            probe = self._views_dir / ".probe"
            write_in_place(probe, self._hosts.path.read_text())
            self._private_hosts = private_hosts_supported(probe)
            if not self._private_hosts:
                log.warning("no mount namespaces here: pods share the machine's /etc/hosts (short names may clash)")
        self.mounts_supported = bind_mounts_supported(self.root / "mount-probe")
        if not self.mounts_supported:
            log.warning("no mount namespaces here: pods that mount their ServiceAccount token cannot start")
        self._write_hosts()
        for name in self.config.nodes:
            self._register(name)
            self._active_nodes.add(name)
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._pod_loop, "pods")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        log.info("stopping: shutting down %d pods", len(self._workers))
        self.stopping.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.shutdown()
        deadline = time.monotonic() + self.config.shutdown_grace_seconds + 15
        for worker in workers:
            worker.join(max(0.1, deadline - time.monotonic()))
        if self.config.remove_nodes_on_stop:
            for name in self.config.nodes:
                for path in (
                    f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}",
                    f"/api/v1/nodes/{name}",
                ):
                    try:
                        self.kube.delete(path)
                    except Exception as exc:  # the control plane may already be gone at teardown
                        log.info("could not delete %s: %s", path, exc)
        if self._hosts is not None:
            try:
                self._hosts.remove()
            except OSError as exc:
                log.warning("cannot remove this agent's block from %s: %s", self._hosts.path, exc)
        for server in self._servers.values():
            server.stop()
        self._claim.close()
        log.info("stopped")

    def ready_info(self) -> dict[str, Any]:
        return {
            "agentId": self.agent_id,
            "pid": os.getpid(),
            "nodes": self.config.nodes,
            "podNetwork": str(self._ips.network),
            "kubeletPorts": {name: server.port for name, server in self._servers.items()},
        }


class _RelistError(Exception):
    """The watch cannot continue from its resource version."""

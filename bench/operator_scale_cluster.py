"""The operator scale benchmark's stand-ins for what a cluster has and this machine lacks: a Node without a kubelet
(tainted, so only the benchmark binds pods to it), the pod status a kubelet would write, and one HTTP server that
serves many trainers' /progress on their loopback addresses."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from typing import Any

from bench.operator_scale_figures import progress_document
from dreambooth_api.constants import LABEL_COMPONENT, Component
from dreambooth_api.env import TRAINER_METRICS_PORT

NODE = "bench-node"
NODE_TAINT = {"key": "dreambooth.dev/bench", "value": "no-kubelet", "effect": "NoSchedule"}


class ProgressServer:
    """One aiohttp app in its own thread, listening on TRAINER_METRICS_PORT of many loopback addresses: each
    address is one pod's, and serves that job's current step."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}  # by pod IP
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="progress-server", daemon=True)
        self._runner: Any = None

    def start(self, ips: list[str]) -> None:
        from aiohttp import web

        async def progress(request: web.Request) -> web.Response:
            self.requests += 1
            ip = (request.transport.get_extra_info("sockname") or ("",))[0] if request.transport else ""
            step = self.steps.get(ip)
            if step is None:
                return web.Response(status=404)
            return web.json_response(progress_document(step))

        async def serve() -> None:
            app = web.Application()
            app.router.add_get("/progress", progress)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            for ip in ips:
                await web.TCPSite(self._runner, ip, TRAINER_METRICS_PORT).start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=60)

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)


# --- the cluster's side of a running pod --------------------------------------------------------------------


def create_node(core: Any) -> None:
    """A Node object without a kubelet (the control plane runs no node-lifecycle controller, so it stays), tainted
    so that the scheduler never places a pod on it: only the benchmark binds pods there."""
    core.create_node(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
            "spec": {"taints": [NODE_TAINT]},
        }
    )


def bind(core: Any, pod: Any) -> None:
    from kubernetes import client

    binding = client.V1Binding(
        metadata=client.V1ObjectMeta(name=pod.metadata.name), target=client.V1ObjectReference(kind="Node", name=NODE)
    )
    core.create_namespaced_pod_binding(pod.metadata.name, pod.metadata.namespace, binding, _preload_content=False)


def pod_status(pod: Any, ip: str, now: str) -> dict[str, Any]:
    """The status a kubelet writes: a trainer pod runs at `ip`; any other pod of a job (the input check that runs
    before the first attempt) has exited 0."""
    container = pod.spec.containers[0]
    trainer = (pod.metadata.labels or {}).get(LABEL_COMPONENT) == Component.TRAINER.value
    state: dict[str, Any] = (
        {"running": {"startedAt": now}}
        if trainer
        else {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}
    )
    ready = "True" if trainer else "False"
    conditions = {"PodScheduled": "True", "Initialized": "True", "ContainersReady": ready, "Ready": ready}
    return {
        "phase": "Running" if trainer else "Succeeded",
        "hostIP": "127.0.0.1",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": [{"type": c, "status": v, "lastTransitionTime": now} for c, v in conditions.items()],
        "containerStatuses": [
            {
                "name": container.name,
                "image": container.image,
                "imageID": "",
                "ready": trainer,
                "started": trainer,
                "restartCount": 0,
                "state": state,
            }
        ],
    }


def run_pod(core: Any, pod: Any, ip: str) -> bool:
    """Bind `pod` to the Node and write the status a kubelet would (`pod_status`); True for a trainer pod."""
    bind(core, pod)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = pod_status(pod, ip, now)
    core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})
    return bool(status["phase"] == "Running")


# --- the phases ----------------------------------------------------------------------------------------------

"""One thread per pod, like the kubelet's pod worker: a small state machine ticked every 0.2 s or on an update.

Stages: ``init`` (init containers one at a time, in order) -> ``main`` (all containers, restarts by
``restartPolicy``, probes) -> ``terminating`` (SIGTERM to every process group, SIGKILL at the grace deadline)
-> ``terminal`` (final status written; on deletion, the final ``DELETE`` with grace 0, as the kubelet does).
Deletion (``deletionTimestamp``), a node shutdown (agent stop, Node deleted) or the pod object vanishing
can move any stage to ``terminating``.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from . import layout
from .envresolve import (
    EnvResolutionError,
    ObjectSource,
    RuntimeFields,
    container_argv,
    image_pull_error,
    resolve_env,
)
from .hostsfile import PodHost
from .kube import ApiException, Kube
from .podstatus import (
    ContainerRecord,
    Running,
    Terminated,
    Waiting,
    build_status,
    exit_code_of,
    exit_reason,
    lost,
    rfc3339,
    termination_message,
)
from .probes import ProbeState, run_probe
from .runtime import ContainerProcess, read_log
from .volumes import PodVolumes

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."


class WorkerContext(Protocol):
    """What a pod worker needs from the agent."""

    @property
    def kube(self) -> Kube: ...
    @property
    def root(self) -> Path: ...
    @property
    def host_ip(self) -> str: ...
    @property
    def source(self) -> ObjectSource: ...
    @property
    def mounts_supported(self) -> bool: ...

    def allocate_ip(self) -> str: ...
    def release_ip(self, ip: str) -> None: ...
    def add_pod_host(self, uid: str, host: PodHost) -> Path | None: ...
    def remove_pod_host(self, uid: str) -> None: ...
    def process_env(self, pod: Mapping[str, Any]) -> dict[str, str]: ...
    def allocatable(self) -> Mapping[str, str]: ...
    def image_entrypoints(self) -> Mapping[str, list[str]]: ...
    def backoff(self, restarts: int) -> float: ...
    def worker_done(self, uid: str) -> None: ...


@dataclass
class _Run:
    """A running container: its process and probes."""

    process: ContainerProcess
    env: dict[str, str]
    run: int
    message_path: Path
    readiness: ProbeState | None
    liveness: ProbeState | None
    startup: ProbeState | None = None
    """Until it succeeds, the kubelet runs neither readiness nor liveness; past its failure threshold it restarts."""
    kill_at: float | None = None


def pod_path(pod: Mapping[str, Any], suffix: str = "") -> str:
    meta = pod["metadata"]
    return f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}{suffix}"


class PodWorker:
    def __init__(self, ctx: WorkerContext, pod: dict[str, Any], shutdown_grace_cap: float) -> None:
        self.ctx = ctx
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.node: str = pod["spec"]["nodeName"]
        self.dir = layout.pod_dir(ctx.root, meta["namespace"], meta["name"], self.uid)
        self.workdir = self.dir / "work"
        spec = pod["spec"]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.init_specs: list[dict[str, Any]] = list(spec.get("initContainers") or [])
        self.main_specs: list[dict[str, Any]] = list(spec["containers"])
        self.init = [_record(c) for c in self.init_specs]
        self.main = [_record(c) for c in self.main_specs]
        if not self.init_specs:
            for record in self.main:
                record.state = Waiting("ContainerCreating")
        self.runs: dict[str, _Run] = {}
        self.volumes = PodVolumes(ctx.kube, ctx.source, self.dir / "volumes")
        self.backoff_until: dict[str, float] = {}
        self.stage = "init"
        self.init_index = 0
        self.initialized = not self.init_specs
        self.pod_ip = ""
        self.hosts_view: Path | None = None
        self.start_time = datetime.now(UTC)
        self.conditions: list[dict[str, Any]] = []
        self.published: dict[str, Any] | None = None
        self.status_reason = ""
        self.status_message = ""
        self.disruption: dict[str, Any] | None = None
        self.terminate_deadline = 0.0
        self.shutdown_grace_cap = shutdown_grace_cap
        self.shutdown_requested = False
        self.object_gone = False
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=f"pod-{self.key}", daemon=True)

    # ---- called from other threads -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def update(self, pod: dict[str, Any]) -> None:
        with self._lock:
            self.pod = pod
        self._wake.set()

    def deleted(self) -> None:
        """The pod object is gone from the API (final delete done, or force-deleted by someone else)."""
        self.object_gone = True
        self._wake.set()

    def shutdown(self) -> None:
        """Node shutdown (the agent stops or the Node was deleted): terminate and report Failed."""
        self.shutdown_requested = True
        self._wake.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # ---- the loop --------------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._setup()
            while not self._tick():
                self._wake.wait(TICK_SECONDS)
                self._wake.clear()
        except Exception:
            log.exception("pod worker %s crashed; killing its processes", self.key)
            for run in self.runs.values():
                run.process.signal(signal.SIGKILL)
        finally:
            self.ctx.remove_pod_host(self.uid)
            if self.pod_ip:
                self.ctx.release_ip(self.pod_ip)
            self.ctx.worker_done(self.uid)

    def _setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        (self.dir / "termination").mkdir(exist_ok=True)
        meta = self.pod["metadata"]
        layout.write_pod_info(
            self.dir,
            {
                "uid": self.uid,
                "namespace": meta["namespace"],
                "name": meta["name"],
                "node": self.node,
                "created": time.time(),
                "containers": [c["name"] for c in self.main_specs],
                "initContainers": [c["name"] for c in self.init_specs],
                "defaultContainer": (meta.get("annotations") or {}).get("kubectl.kubernetes.io/default-container"),
            },
        )
        (self.dir / "object.json").write_text(json.dumps(self.pod, indent=1))  # the pod as first seen, for debugging
        self.pod_ip = self.ctx.allocate_ip()
        spec = self.pod["spec"]
        host = PodHost(self.pod_ip, meta["namespace"], spec.get("hostname", ""), spec.get("subdomain", ""))
        self.hosts_view = self.ctx.add_pod_host(self.uid, host)
        log.info("pod %s (uid %s) on %s gets IP %s", self.key, self.uid, self.node, self.pod_ip)

    def _tick(self) -> bool:
        """One step; True when the worker is finished."""
        with self._lock:
            pod = self.pod
        meta = pod["metadata"]
        if self.object_gone:
            self._kill_all(grace=2.0)
            return True
        deleting = meta.get("deletionTimestamp") is not None
        if self.stage not in ("terminating", "terminal") and (deleting or self.shutdown_requested):
            self._begin_termination(pod)
        if self.stage == "init":
            self._step_init()
        if self.stage == "main":
            self._step_main()
        if self.stage == "terminating":
            self._step_terminating()
        if not self._publish():
            return False
        if self.stage == "terminal":
            # Done. A later deletion of a terminal pod needs only the final DELETE, which the agent sends.
            return self._final_delete(pod) if deleting else True
        return False

    # ---- containers ------------------------------------------------------------------------------------------
    def _start(self, spec: dict[str, Any], record: ContainerRecord) -> None:
        name = spec["name"]
        if time.monotonic() < self.backoff_until.get(name, 0.0):
            return
        pull_error = image_pull_error(str(spec.get("image", "")))
        if pull_error is not None:
            # As the kubelet: ErrImagePull on the first try, then ImagePullBackOff between retries.
            pulled_before = isinstance(record.state, Waiting) and record.state.reason in (
                "ErrImagePull",
                "ImagePullBackOff",
            )
            record.state = Waiting("ImagePullBackOff" if pulled_before else "ErrImagePull", pull_error)
            self.backoff_until[name] = time.monotonic() + 1.0
            return
        runtime = RuntimeFields(pod_ip=self.pod_ip, host_ip=self.ctx.host_ip)
        try:
            env = self.ctx.process_env(self.pod)
            env.update(resolve_env(self.pod, spec, self.ctx.source, runtime, self.ctx.allocatable()))
            run_index = record.restart_count
            message_path = self.dir / "termination" / f"{name}-{run_index}"
            message_path.write_text("")
            env["TERMINATION_MESSAGE_PATH"] = str(message_path)
            argv = container_argv(spec, env, self.ctx.image_entrypoints())
            mounts = self.volumes.mounts(self.pod, spec, runtime)
            if mounts and not self.ctx.mounts_supported:
                raise EnvResolutionError("no mount namespaces on this machine: cannot mount the projected volumes")
        except (EnvResolutionError, ApiException, OSError) as exc:  # (OSError: a volume's files or mount point)
            record.state = Waiting("CreateContainerConfigError", str(exc))
            self.backoff_until[name] = time.monotonic() + 1.0
            return
        log_file = layout.log_path(self.dir, name, run_index)
        try:
            binds = [(m.source, m.target, m.read_only) for m in mounts]
            process = ContainerProcess(argv, env, self.workdir, log_file, self.hosts_view, binds)
        except (OSError, subprocess.SubprocessError) as exc:
            now = datetime.now(UTC)
            self._exited(spec, record, Terminated(128, "StartError", now, now, f"failed to start {argv[0]!r}: {exc}"))
            return
        readiness = spec.get("readinessProbe")
        liveness = spec.get("livenessProbe")
        startup = spec.get("startupProbe")
        started = time.monotonic()
        self.runs[name] = _Run(
            process=process,
            env=env,
            run=run_index,
            message_path=message_path,
            readiness=ProbeState(readiness, started) if readiness else None,
            liveness=ProbeState(liveness, started) if liveness else None,
            startup=ProbeState(startup, started) if startup else None,
        )
        record.container_id = f"{self.uid}-{name}-{run_index}"
        record.state = Running(process.started_at)
        # Without a readiness probe a container is ready once started (after its startup probe, if any).
        record.ready = readiness is None and startup is None and not _is_init(record, self.init)
        log.info("pod %s: started %s (pid %d): %s", self.key, name, process.pid, argv)

    def _poll(self, spec: dict[str, Any], record: ContainerRecord) -> Terminated | None:
        run = self.runs.get(spec["name"])
        if run is None:
            return None
        code = run.process.poll()
        if code is None:
            return None
        del self.runs[spec["name"]]
        exit_code = exit_code_of(code)
        log_text = read_log(run.process.log_path, tail_lines=80)
        message = termination_message(
            run.message_path.read_text(errors="replace") if run.message_path.exists() else "",
            log_text,
            policy=spec.get("terminationMessagePolicy", "File"),
            exit_code=exit_code,
        )
        finished = datetime.now(UTC)
        signal_number = -code if code < 0 else None
        log.info("pod %s: container %s exited with %d", self.key, spec["name"], exit_code)
        return Terminated(exit_code, exit_reason(exit_code), run.process.started_at, finished, message, signal_number)

    def _exited(self, spec: dict[str, Any], record: ContainerRecord, term: Terminated) -> bool:
        """Record an exit; True when the container will be restarted."""
        record.ready = False
        restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and term.exit_code != 0)
        if restart and self.stage in ("init", "main"):
            record.last_state = term
            record.restart_count += 1
            delay = self.ctx.backoff(record.restart_count)
            record.state = Waiting(
                "CrashLoopBackOff", f"back-off {delay:g}s restarting failed container={spec['name']} pod={self.key}"
            )
            self.backoff_until[spec["name"]] = time.monotonic() + delay
            return True
        record.state = term
        return False

    def _step_init(self) -> None:
        while self.init_index < len(self.init_specs):
            spec, record = self.init_specs[self.init_index], self.init[self.init_index]
            if spec["name"] not in self.runs:
                self._start(spec, record)
                if isinstance(record.state, Terminated) and record.state.exit_code != 0:
                    self.stage = "terminal"
                return
            term = self._poll(spec, record)
            if term is None:
                return
            if term.exit_code == 0:
                record.state = term
                self.init_index += 1
                continue
            if not self._exited(spec, record, term):
                self.stage = "terminal"
            return
        self.initialized = True
        self.stage = "main"
        for record in self.main:
            if isinstance(record.state, Waiting) and record.state.reason == "PodInitializing":
                record.state = Waiting("ContainerCreating")

    def _step_main(self) -> None:
        now = time.monotonic()
        if self.runs and self.volumes.renewing:
            try:
                self.volumes.refresh(self.pod)
            except ApiException as exc:  # retried next tick, as the kubelet retries
                log.warning("pod %s: token refresh failed (%s)", self.key, exc.status)
        for spec, record in zip(self.main_specs, self.main, strict=True):
            name = spec["name"]
            if name not in self.runs:
                if not isinstance(record.state, Terminated):
                    self._start(spec, record)
                continue
            term = self._poll(spec, record)
            if term is not None:
                self._exited(spec, record, term)
                continue
            run = self.runs[name]
            self._probe(spec, record, run, now)
        if not self.runs and all(isinstance(r.state, Terminated) for r in self.main):
            self.stage = "terminal"

    def _probe(self, spec: dict[str, Any], record: ContainerRecord, run: _Run, now: float) -> None:
        startup = run.startup
        if startup is not None and not startup.success and run.kill_at is None:
            if startup.due(now):
                startup.record(run_probe(startup.probe, spec, self.pod_ip, run.env, self.workdir), now)
            if startup.failed:
                log.info("pod %s: startup probe of %s failed; restarting it", self.key, spec["name"])
                run.process.signal(signal.SIGTERM)
                run.kill_at = now + self._grace_seconds(self.pod)
            elif startup.success:  # the other probes start now, as the kubelet starts them
                for other in (run.readiness, run.liveness):
                    if other is not None:
                        other.next_at = now
                record.ready = run.readiness is None
        if startup is not None and not startup.success:
            if run.kill_at is not None and now >= run.kill_at:
                run.process.signal(signal.SIGKILL)
            return
        if run.readiness is not None and run.readiness.due(now):
            run.readiness.record(run_probe(run.readiness.probe, spec, self.pod_ip, run.env, self.workdir), now)
            record.ready = run.readiness.success
        if run.liveness is not None and run.kill_at is None and run.liveness.due(now):
            run.liveness.record(run_probe(run.liveness.probe, spec, self.pod_ip, run.env, self.workdir), now)
            if run.liveness.failed:
                log.info("pod %s: liveness probe of %s failed; restarting it", self.key, spec["name"])
                run.process.signal(signal.SIGTERM)
                run.kill_at = now + self._grace_seconds(self.pod)
        if run.kill_at is not None and now >= run.kill_at:
            run.process.signal(signal.SIGKILL)

    # ---- termination -----------------------------------------------------------------------------------------
    def _grace_seconds(self, pod: Mapping[str, Any]) -> float:
        meta, spec = pod["metadata"], pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        return float(grace)

    def _begin_termination(self, pod: dict[str, Any]) -> None:
        grace = self._grace_seconds(pod)
        if self.shutdown_requested:
            grace = min(grace, self.shutdown_grace_cap)
            self.status_reason, self.status_message = "Terminated", SHUTDOWN_MESSAGE
            self.disruption = {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "TerminationByKubelet",
                "message": SHUTDOWN_MESSAGE,
                "lastTransitionTime": rfc3339(datetime.now(UTC)),
            }
        log.info("pod %s: terminating with a grace period of %gs", self.key, grace)
        self.stage = "terminating"
        self.terminate_deadline = time.monotonic() + grace
        for run in self.runs.values():
            run.process.signal(signal.SIGTERM)
        for record in [*self.init, *self.main]:
            record.ready = False

    def _step_terminating(self) -> None:
        for spec, record in zip([*self.init_specs, *self.main_specs], [*self.init, *self.main], strict=True):
            term = self._poll(spec, record)
            if term is not None:
                record.state = term
        if self.runs and time.monotonic() >= self.terminate_deadline:
            log.info("pod %s: grace period over; SIGKILL", self.key)
            for run in self.runs.values():
                run.process.signal(signal.SIGKILL)
            self.terminate_deadline = time.monotonic() + 5.0
        if not self.runs:
            self._settle_unfinished()
            self.stage = "terminal"

    def _settle_unfinished(self) -> None:
        """Containers that never ran (or were waiting to restart) end as the kubelet reports them: terminated."""
        now = datetime.now(UTC)
        for record in [*self.init, *self.main]:
            if isinstance(record.state, Terminated):
                continue
            if record.last_state is not None:
                record.state = record.last_state
            else:
                record.state = lost(now)

    def _kill_all(self, grace: float) -> None:
        for run in self.runs.values():
            run.process.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for run in self.runs.values():
            run.process.wait(max(0.0, deadline - time.monotonic()))
            run.process.signal(signal.SIGKILL)
        self.runs.clear()

    # ---- API writes ------------------------------------------------------------------------------------------
    def _publish(self) -> bool:
        """Patch the status when it changed; False when it could not be written (retried next tick)."""
        terminal = self.stage == "terminal"
        if terminal and not self.initialized:
            self._settle_unfinished()
        status = build_status(
            self.init,
            self.main,
            initialized=self.initialized,
            terminal=terminal,
            pod_ip=self.pod_ip,
            host_ip=self.ctx.host_ip,
            start_time=self.start_time,
            previous_conditions=self.conditions,
            now=datetime.now(UTC),
            reason=self.status_reason,
            message=self.status_message,
        )
        if self.disruption is not None:
            # Like the kubelet's node shutdown manager: the condition at once, phase Failed once processes are gone.
            status["conditions"].append(self.disruption)
            if terminal:
                status["phase"] = "Failed"
        if status == self.published:
            return True
        try:
            self.ctx.kube.patch(pod_path(self.pod, "/status"), {"status": status})
        except ApiException as exc:
            if exc.status == 404:
                self.object_gone = True
                return True
            log.warning("pod %s: status patch failed (%s); retrying", self.key, exc.status)
            return False
        self.published = status
        self.conditions = status["conditions"]
        return True

    def _final_delete(self, pod: Mapping[str, Any]) -> bool:
        if not final_delete(self.ctx.kube, pod):
            return False
        log.info("pod %s: removed", self.key)
        return True


def final_delete(kube: Kube, pod: Mapping[str, Any]) -> bool:
    """The kubelet's last word on a terminated pod: DELETE with grace 0 (the uid guards a recreated namesake).
    False when it should be retried."""
    body = {"gracePeriodSeconds": 0, "preconditions": {"uid": pod["metadata"]["uid"]}}
    try:
        kube.delete(pod_path(pod), body)
    except ApiException as exc:
        if exc.status not in (404, 409):
            log.warning("final delete of %s failed (%s)", pod["metadata"]["name"], exc.status)
            return False
    return True


def _is_init(record: ContainerRecord, init: list[ContainerRecord]) -> bool:
    return any(record is r for r in init)


def _record(spec: Mapping[str, Any]) -> ContainerRecord:
    return ContainerRecord(spec["name"], spec.get("image", ""), Waiting("PodInitializing"))

"""Fluent builders of DreamBoothJobs, batch Jobs and pods for the operator's tests (JobSet's wrappers style).

make_job("cat").nodes(2).gpus(4).obj()
make_pod(job, attempt=0, rank=0).running("127.0.1.5").obj()
make_batch_job(job, attempt=0).complete().obj()
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any, Self

API_VERSION = "dreambooth.dev/v1alpha1"
T0 = datetime(2026, 11, 27, 0, 0, 0, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _controller(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True}


class JobWrapper:
    def __init__(self, name: str, namespace: str = "team-a") -> None:
        self._obj: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": "DreamBoothJob",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1},
            "spec": {
                "baseModel": {"tiny": True},
                "instanceImages": {"uri": "s3://bucket/photos/", "prompt": "a photo of sks cat"},
                "output": {"uri": "s3://bucket/out/cat"},
                "resources": {"nodes": 1, "gpusPerNode": 0},
            },
        }

    @property
    def _spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self._obj["spec"]
        return spec

    def _section(self, key: str) -> dict[str, Any]:
        section: dict[str, Any] = self._spec.setdefault(key, {})
        return section

    def nodes(self, n: int) -> Self:
        self._section("resources")["nodes"] = n
        if n > 1:
            self._spec["output"]["checkpointUri"] = "s3://bucket/ckpt/cat"
        return self

    def gpus(self, n: int, resource: str | None = None) -> Self:
        self._section("resources")["gpusPerNode"] = n
        if resource:
            self._section("resources")["gpuResourceName"] = resource
        return self

    def cpu_memory(self, cpu: str, memory: str, shm: str | None = None) -> Self:
        res = self._section("resources")
        res.update({"cpu": cpu, "memory": memory})
        if shm:
            res["sharedMemory"] = shm
        return self

    def training(self, **fields: Any) -> Self:
        self._section("training").update(fields)
        return self

    def storage(self, endpoint: str | None = None, secret: str | None = None, **more: Any) -> Self:
        storage = self._section("storage")
        if endpoint:
            storage["endpoint"] = endpoint
        if secret:
            storage["credentialsSecret"] = {"name": secret}
        storage.update(more)
        return self

    def pod_template(self, **fields: Any) -> Self:
        self._section("podTemplate").update(fields)
        return self

    def run_policy(self, **fields: Any) -> Self:
        self._section("runPolicy").update(fields)
        return self

    def suspend(self, value: bool = True) -> Self:
        return self.run_policy(suspend=value)

    def label(self, key: str, value: str) -> Self:
        self._obj["metadata"].setdefault("labels", {})[key] = value
        return self

    def queue(self, name: str) -> Self:
        return self.label("kueue.x-k8s.io/queue-name", name)

    def annotation(self, key: str, value: str) -> Self:
        self._obj["metadata"].setdefault("annotations", {})[key] = value
        return self

    def counted(self, *uids: str) -> Self:
        return self.annotation("dreambooth.dev/counted-preemptions", json.dumps(list(uids)))

    def generation(self, g: int) -> Self:
        self._obj["metadata"]["generation"] = g
        return self

    def status(self, **fields: Any) -> Self:
        self._obj.setdefault("status", {}).update(fields)
        return self

    def no_preflight(self) -> Self:
        """runPolicy.preflight: false, for tests of what happens after the input check (policies/preflight.py)."""
        self._section("runPolicy")["preflight"] = False
        return self

    def obj(self) -> dict[str, Any]:
        return copy.deepcopy(self._obj)


def make_job(name: str = "cat", namespace: str = "team-a") -> JobWrapper:
    return JobWrapper(name, namespace)


class BatchJobWrapper:
    def __init__(self, job: dict[str, Any], attempt: int) -> None:
        name = job["metadata"]["name"]
        self._obj: dict[str, Any] = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": f"{name}-a{attempt}",
                "namespace": job["metadata"]["namespace"],
                "uid": f"uid-{name}-a{attempt}",
                "labels": {"dreambooth.dev/job-name": name, "dreambooth.dev/attempt": str(attempt)},
                "ownerReferences": [_controller(API_VERSION, "DreamBoothJob", name, job["metadata"]["uid"])],
            },
            "spec": {"suspend": False},
            "status": {},
        }

    def _cond(self, type_: str, reason: str, message: str = "") -> Self:
        self._obj["status"].setdefault("conditions", []).append(
            {"type": type_, "status": "True", "reason": reason, "message": message}
        )
        return self

    def complete(self) -> Self:
        return self._cond("Complete", "CompletionsReached")

    def failed(self, reason: str = "BackoffLimitExceeded", message: str = "Job has reached the backoff limit") -> Self:
        return self._cond("Failed", reason, message)

    def suspended(self, value: bool = True) -> Self:
        self._obj["spec"]["suspend"] = value
        return self

    def failed_count(self, n: int) -> Self:
        self._obj["status"]["failed"] = n
        return self

    def counters(self, **counts: int) -> Self:
        """The Job controller's status counters (active, ready, succeeded, failed)."""
        self._obj["status"].update(counts)
        return self

    def owner(self, uid: str) -> Self:
        """Controlled by another DreamBoothJob object (say, an earlier one with the same name)."""
        self._obj["metadata"]["ownerReferences"][0]["uid"] = uid
        return self

    def deleting(self) -> Self:
        self._obj["metadata"]["deletionTimestamp"] = iso(T0)
        return self

    def pod_spec_hash(self, value: str) -> Self:
        self._obj["metadata"].setdefault("annotations", {})["dreambooth.dev/pod-spec-hash"] = value
        return self

    def obj(self) -> dict[str, Any]:
        return copy.deepcopy(self._obj)


def make_batch_job(job: dict[str, Any], attempt: int = 0) -> BatchJobWrapper:
    return BatchJobWrapper(job, attempt)


class PodWrapper:
    def __init__(self, job: dict[str, Any], attempt: int, rank: int, uid: str | None) -> None:
        name = job["metadata"]["name"]
        self._obj: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-a{attempt}-{rank}-abcde",
                "namespace": job["metadata"]["namespace"],
                "uid": uid or f"pod-{name}-a{attempt}-{rank}",
                "labels": {
                    "dreambooth.dev/job-name": name,
                    "dreambooth.dev/attempt": str(attempt),
                    "batch.kubernetes.io/job-completion-index": str(rank),
                },
                "ownerReferences": [_controller("batch/v1", "Job", f"{name}-a{attempt}", f"uid-{name}-a{attempt}")],
            },
            "status": {"phase": "Pending"},
        }

    @property
    def _status(self) -> dict[str, Any]:
        status: dict[str, Any] = self._obj["status"]
        return status

    def _container(self, state: dict[str, Any]) -> Self:
        self._status["containerStatuses"] = [{"name": "trainer", "state": state}]
        return self

    def running(self, ip: str = "127.0.1.2", started: datetime = T0) -> Self:
        self._status.update({"phase": "Running", "podIP": ip, "startTime": iso(started)})
        return self._container({"running": {"startedAt": iso(started)}})

    def unschedulable(self, message: str = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.") -> Self:
        self._status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        ]
        return self

    def image_pull(self, reason: str = "ImagePullBackOff", message: str = "back-off pulling image") -> Self:
        return self._container({"waiting": {"reason": reason, "message": message}})

    def scheduled(self, at: datetime = T0) -> Self:
        """Bound to a node at `at` (the PodScheduled condition)."""
        conditions = [c for c in self._status.get("conditions", []) if c["type"] != "PodScheduled"]
        conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": iso(at)})
        self._status["conditions"] = conditions
        return self

    def exited(self, code: int, message: dict[str, Any] | str | None = None, finished: datetime | None = None) -> Self:
        self._status["phase"] = "Succeeded" if code == 0 else "Failed"
        term: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        if finished is not None:
            term["finishedAt"] = iso(finished)
        if message is not None:
            term["message"] = message if isinstance(message, str) else json.dumps(message)
        return self._container({"terminated": term})

    def disrupted(self) -> Self:
        self._status.setdefault("conditions", []).append(
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
        )
        return self

    def deleting(self, at: datetime = T0) -> Self:
        """Deletion requested; `at` is the deletionTimestamp (the request time plus the grace period)."""
        self._obj["metadata"]["deletionTimestamp"] = iso(at)
        return self

    def owner(self, uid: str) -> Self:
        """Controlled by another batch Job (say, one of an earlier DreamBoothJob with the same name)."""
        self._obj["metadata"]["ownerReferences"][0]["uid"] = uid
        return self

    def obj(self) -> dict[str, Any]:
        return copy.deepcopy(self._obj)


def make_pod(job: dict[str, Any], attempt: int = 0, rank: int = 0, uid: str | None = None) -> PodWrapper:
    return PodWrapper(job, attempt, rank, uid)

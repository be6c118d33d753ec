"""Pure builders: a DreamBoothJob -> its children (ConfigMap, headless Service, Indexed batch/v1 Job).

Each builder takes the custom resource as a plain dict (as kopf passes it) and returns a complete manifest
with the owner reference set (``kopf.adopt``); nothing here talks to the API server.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final, cast

import kopf

from dreambooth_api import env as envnames
from dreambooth_api.constants import (
    ANNOTATION_POD_SPEC_HASH,
    KUEUE_PRIORITY_CLASS_LABEL,
    KUEUE_QUEUE_LABEL,
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    Component,
)
from dreambooth_api.env import TRAINER_MASTER_PORT, TRAINER_METRICS_PORT
from dreambooth_api.exitcodes import ExitCode
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_api.trainer_config import CONFIG_KEY, render_trainer_config
from dreambooth_operator import names
from dreambooth_operator.layout import (
    COMPLETION_INDEX_ANNOTATION,
    CONTAINER_NAME,
    MASTER_PORT_NAME,
    METRICS_PORT_NAME,
    MODEL_CACHE_MOUNT,
    MODEL_CACHE_VOLUME,
    SHM_VOLUME,
)
from dreambooth_operator.settings import OperatorSettings


def parse_spec(job: Mapping[str, Any]) -> DreamBoothJobSpec:
    """The spec with the operator-owned defaults filled in."""
    return DreamBoothJobSpec.model_validate(job.get("spec") or {})


def _name(job: Mapping[str, Any]) -> str:
    return str(job["metadata"]["name"])


def child_labels(job: Mapping[str, Any], component: Component = Component.TRAINER) -> dict[str, str]:
    """Labels on every child: the selector the operator and `kubectl get -l` use."""
    return {LABEL_JOB_NAME: _name(job), LABEL_COMPONENT: component.value, LABEL_MANAGED_BY: MANAGED_BY}


def adopt(child: dict[str, Any], job: Mapping[str, Any]) -> dict[str, Any]:
    # kopf.adopt sets the namespace, a controller ownerReference (blockOwnerDeletion) and copies the owner's
    # labels that the child does not set itself (so a Kueue queue-name label reaches the batch Job).
    kopf.adopt(child, owner=cast("kopf.Body", dict(job)))
    return child


def build_configmap(job: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's JobConfig as JSON, given to the container as DREAMBOOTH_CONFIG (configMapKeyRef)."""
    return adopt(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": names.configmap_name(_name(job)), "labels": child_labels(job)},
            "data": {CONFIG_KEY: render_trainer_config(job)},
        },
        job,
    )


def build_service(job: Mapping[str, Any]) -> dict[str, Any]:
    """The headless Service behind the pods' `<hostname>.<subdomain>` names (rank 0 is the rendezvous)."""
    return adopt(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": names.service_name(_name(job)), "labels": child_labels(job)},
            "spec": {
                "clusterIP": "None",
                # Ranks must resolve each other before any of them is ready.
                "publishNotReadyAddresses": True,
                "selector": {LABEL_JOB_NAME: _name(job), LABEL_COMPONENT: Component.TRAINER.value},
                "ports": [
                    {"name": MASTER_PORT_NAME, "port": TRAINER_MASTER_PORT, "targetPort": TRAINER_MASTER_PORT},
                    {"name": METRICS_PORT_NAME, "port": TRAINER_METRICS_PORT, "targetPort": TRAINER_METRICS_PORT},
                ],
            },
        },
        job,
    )


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _env(job: Mapping[str, Any], spec: DreamBoothJobSpec, attempt: int, settings: OperatorSettings) -> list[Any]:
    name = _name(job)
    nodes = spec.resources.nodes
    nproc = max(1, spec.resources.gpus_per_node)
    master = names.master_address(name, attempt)
    rank_path = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
    grace = max(1, settings.termination_grace_seconds - settings.grace_margin_seconds)
    env: list[dict[str, Any]] = [
        {
            "name": envnames.CONFIG,
            "valueFrom": {"configMapKeyRef": {"name": names.configmap_name(name), "key": CONFIG_KEY}},
        },
        {"name": envnames.ATTEMPT, "value": str(attempt)},
        _field_env(envnames.BIND_ADDRESS, "status.podIP"),
        {"name": envnames.METRICS_PORT, "value": str(TRAINER_METRICS_PORT)},
        {"name": envnames.GRACE_SECONDS, "value": str(grace)},
        {"name": envnames.PET_NNODES, "value": str(nodes)},
        {"name": envnames.PET_NPROC_PER_NODE, "value": str(nproc)},
        _field_env(envnames.PET_NODE_RANK, rank_path),
        {"name": envnames.PET_MASTER_ADDR, "value": master},
        {"name": envnames.PET_MASTER_PORT, "value": str(TRAINER_MASTER_PORT)},
        {"name": envnames.MASTER_ADDR, "value": master},
        {"name": envnames.MASTER_PORT, "value": str(TRAINER_MASTER_PORT)},
        {"name": envnames.WORLD_SIZE, "value": str(nodes * nproc)},
        _field_env(envnames.NODE_RANK, rank_path),
        *model_cache(settings)[2],
    ]
    creds = spec.storage.credentials_secret
    if creds is not None:
        keys = [
            (envnames.AWS_ACCESS_KEY_ID, creds.access_key_id_key),
            (envnames.AWS_SECRET_ACCESS_KEY, creds.secret_access_key_key),
        ]
        if creds.session_token_key:
            keys.append((envnames.AWS_SESSION_TOKEN, creds.session_token_key))
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": creds.name, "key": key}}} for var, key in keys]
    vlm_secret = spec.vlm_secret()
    if vlm_secret is not None:  # the value stays in the Secret: only the reference is in the pod spec
        env.append(
            {
                "name": envnames.VLM_API_KEY,
                "valueFrom": {"secretKeyRef": {"name": vlm_secret.name, "key": vlm_secret.key}},
            }
        )
    overrides = spec.pod_template.env if spec.pod_template and spec.pod_template.env else []
    user = [e.to_wire() for e in overrides]
    user_names = {e["name"] for e in user}
    return [e for e in env if e["name"] not in user_names] + user


def container_resources(cpu: Any, memory: Any, gpu_resource: str, gpus: int) -> dict[str, Any]:
    """requests == limits for CPU and memory (when set) and the GPUs (an extended resource, when > 0)."""
    requests: dict[str, Any] = {}
    if cpu is not None:
        requests["cpu"] = str(cpu)
    if memory is not None:
        requests["memory"] = str(memory)
    if gpus > 0:
        requests[gpu_resource] = str(gpus)
    return {"requests": requests, "limits": dict(requests)} if requests else {}


def pod_metadata(spec: DreamBoothJobSpec, labels: Mapping[str, str]) -> dict[str, Any]:
    """A child pod's metadata: the user's podTemplate labels and annotations, with `labels` (ours) over theirs."""
    overrides = spec.pod_template
    metadata: dict[str, Any] = {"labels": {**(overrides.labels if overrides and overrides.labels else {}), **labels}}
    if overrides and overrides.annotations:
        metadata["annotations"] = dict(overrides.annotations)
    return metadata


def trainer_image(spec: DreamBoothJobSpec, settings: OperatorSettings) -> str:
    """The podTemplate's image, else the operator's trainer image."""
    overrides = spec.pod_template
    return overrides.image if overrides and overrides.image else settings.trainer_image


def _resources(spec: DreamBoothJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    res = spec.resources
    gpu_resource = res.gpu_resource_name or settings.gpu_resource_name
    return container_resources(res.cpu, res.memory, gpu_resource, res.gpus_per_node)


RESTRICTED_CONTAINER_SECURITY: Final[dict[str, Any]] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


TRAINER_GID: Final = 10001
"""The trainer image's group (images/trainer/Dockerfile): owner of the shared model cache volume's files."""


def pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    """The restricted pod securityContext; with a model cache volume, fsGroup makes it writable by the trainer's
    group where the volume supports ownership management (an NFS-like volume must be writable by gid 10001)."""
    context: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if settings.model_cache_volume:
        context |= {"fsGroup": TRAINER_GID, "fsGroupChangePolicy": "OnRootMismatch"}
    return context


def model_cache(settings: OperatorSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The volume, mount and environment that point a trainer or sampling-server pod at the shared base-model cache
    (all empty when `model_cache_volume` is not configured)."""
    if not settings.model_cache_volume:
        return [], [], []
    return (
        [{"name": MODEL_CACHE_VOLUME, **settings.model_cache_volume}],
        [{"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_MOUNT}],
        [{"name": envnames.MODEL_CACHE_DIR, "value": MODEL_CACHE_MOUNT}],
    )


def shared_memory_volume(size: object | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) of the memory-backed /dev/shm of a training or sampling-server pod; `size` limits it."""
    empty_dir: dict[str, Any] = {"medium": "Memory"}
    if size is not None:
        empty_dir["sizeLimit"] = str(size)
    mount = {"name": SHM_VOLUME, "mountPath": "/dev/shm"}  # noqa: S108 - the pod's shared memory
    return {"name": SHM_VOLUME, "emptyDir": empty_dir}, mount


def apply_scheduling_overrides(pod_spec: dict[str, Any], overrides: Any) -> None:
    """Copy a podTemplate's scheduling and identity fields (node selection, tolerations, affinity, priority, pull
    secrets, service account) into a pod spec; shared by training and serving pods.

    The ServiceAccount token is not mounted unless the podTemplate asks for it (automountServiceAccountToken: true):
    the trainer and the sampling server never call the Kubernetes API, and a token in a pod that runs a user-chosen
    image would hand its ServiceAccount's rights to whoever controls that image."""
    pod_spec["automountServiceAccountToken"] = bool(overrides and overrides.automount_service_account_token)
    if not overrides:
        return
    wire = overrides.to_wire()
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        if key in wire:
            pod_spec[key] = wire[key]
    if overrides.service_account_name:
        pod_spec["serviceAccountName"] = overrides.service_account_name


def build_pod_template(
    job: Mapping[str, Any], spec: DreamBoothJobSpec, attempt: int, settings: OperatorSettings
) -> dict[str, Any]:
    """The training pod of one attempt (every rank; the rank comes from the completion index)."""
    name = _name(job)
    overrides = spec.pod_template
    metadata = pod_metadata(spec, {**child_labels(job), LABEL_ATTEMPT: str(attempt)})
    cache_volumes, cache_mounts, _ = model_cache(settings)
    shm_volume, shm_mount = shared_memory_volume(spec.resources.shared_memory)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": trainer_image(spec, settings),
        "command": list(settings.trainer_command),
        "env": _env(job, spec, attempt, settings),
        "ports": [
            {"name": METRICS_PORT_NAME, "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"},
            {"name": MASTER_PORT_NAME, "containerPort": TRAINER_MASTER_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": METRICS_PORT_NAME},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": _resources(spec, settings),
        "volumeMounts": [shm_mount, *cache_mounts],
        "securityContext": dict(RESTRICTED_CONTAINER_SECURITY),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if overrides and overrides.image_pull_policy:
        container["imagePullPolicy"] = overrides.image_pull_policy.value
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": names.service_name(name),
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": pod_security_context(settings),
        "containers": [container],
        "volumes": [shm_volume, *cache_volumes],
    }
    apply_scheduling_overrides(pod_spec, overrides)
    return {"metadata": metadata, "spec": pod_spec}


def invalid_input_rules() -> list[dict[str, Any]]:
    """podFailurePolicy rules of every pod that reads the job's input (trainer and input check): a disruption
    (eviction, preemption) is no failed try, invalid input (exit 10) fails the Job at once."""
    return [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": [int(ExitCode.INVALID_INPUT)]},
        },
    ]


def pod_failure_policy() -> dict[str, Any]:
    """Preemption never uses up backoffLimit; invalid input fails the Job at once (docs/contracts.md)."""
    return {
        "rules": [
            *invalid_input_rules(),
            {
                "action": "Ignore",
                "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": [int(ExitCode.PREEMPTED)]},
            },
        ]
    }


def is_queued_by_kueue(job: Mapping[str, Any]) -> bool:
    return KUEUE_QUEUE_LABEL in (job.get("metadata", {}).get("labels") or {})


def pod_spec_hash(spec: DreamBoothJobSpec) -> str:
    """A hash of the mutable spec fields that shape the pods (podTemplate, storage). An attempt whose pods cannot
    start (image pull, scheduling) is replaced when the user changes them (reconcile.py)."""
    wire = {
        "podTemplate": spec.pod_template.to_wire() if spec.pod_template else None,
        "storage": spec.storage.to_wire(),
    }
    return hashlib.sha256(json.dumps(wire, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def build_batch_job(job: Mapping[str, Any], attempt: int, settings: OperatorSettings) -> dict[str, Any]:
    """The Indexed batch/v1 Job of one gang attempt.

    Single-node jobs leave retries to the Job controller (backoffLimit, podFailurePolicy). Multi-node jobs
    restart the whole gang instead, so their Job never retries a rank (backoffLimit 0): the operator deletes
    the attempt and creates the next one.
    """
    spec = parse_spec(job)
    nodes = spec.resources.nodes
    labels = {**child_labels(job), LABEL_ATTEMPT: str(attempt)}
    owner_labels = job.get("metadata", {}).get("labels") or {}
    for key in (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_CLASS_LABEL):
        if key in owner_labels:
            labels[key] = owner_labels[key]
    # Kueue admits a queued Job by unsuspending it; the user's suspend wins in both cases.
    suspend = spec.run_policy.suspend or is_queued_by_kueue(job)
    return adopt(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": names.batch_job_name(_name(job), attempt),
                "labels": labels,
                "annotations": {ANNOTATION_POD_SPEC_HASH: pod_spec_hash(spec)},
            },
            "spec": {
                "completionMode": "Indexed",
                "completions": nodes,
                "parallelism": nodes,
                "backoffLimit": spec.run_policy.backoff_limit if nodes == 1 else 0,
                "podFailurePolicy": pod_failure_policy(),
                # A replacement pod starts only after the old one has finished writing its checkpoint.
                "podReplacementPolicy": "Failed",
                "suspend": suspend,
                "template": build_pod_template(job, spec, attempt, settings),
            },
        },
        job,
    )

"""InferenceService builders (pure): the Deployment, Service and HPA that run `dreambooth-serve`, and the
replica count the operator applies.

With autoscaling (maxReplicas above minReplicas) an HPA owns the Deployment's replica count: the operator sets it
only when it creates the Deployment (to minReplicas), and hands the field over when a fixed count was set before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import kopf

from dreambooth_api import env as envnames
from dreambooth_api.constants import LABEL_COMPONENT, LABEL_INFERENCE_NAME, LABEL_MANAGED_BY, MANAGED_BY, Component
from dreambooth_api.inference import InferenceServiceSpec
from dreambooth_operator.builders import (
    RESTRICTED_CONTAINER_SECURITY,
    apply_scheduling_overrides,
    container_resources,
    model_cache,
    pod_security_context,
    shared_memory_volume,
)
from dreambooth_operator.layout import FIELD_MANAGER
from dreambooth_operator.settings import OperatorSettings

SERVE_PORT: Final = envnames.SERVE_DEFAULT_PORT
SERVICE_PORT: Final = 80
STARTUP_PROBE_FAILURES: Final = 360
"""Startup probe failures (every 5 s) before the kubelet restarts a server that is still loading: 30 minutes."""
CONTAINER: Final = "server"
CONFIG_ENV: Final = envnames.SERVE_CONFIG
# The sampling server's gauge (trainer serve.py INFLIGHT); the HPA reads it through a custom metrics adapter.
INFLIGHT_METRIC: Final = "dreambooth_serve_inflight_requests"
DEFAULT_TARGET_INFLIGHT: Final = 2
HPA_API_VERSION: Final = "autoscaling/v2"
HPA_KIND: Final = "HorizontalPodAutoscaler"
# spec.subjects: the ConfigMap `<service>-subjects` (key SUBJECTS_KEY), mounted read-only at SUBJECTS_DIR. The mount
# is static: a new subject changes the ConfigMap's content only (the kubelet swaps the file), never the pod template.
SUBJECTS_KEY: Final = "subjects.json"
SUBJECTS_VOLUME: Final = "subjects"
SUBJECTS_DIR: Final = "/etc/dreambooth/subjects"
SUBJECTS_FILE: Final = f"{SUBJECTS_DIR}/{SUBJECTS_KEY}"
# The field manager that keeps a Deployment's spec.replicas when the operator's apply stops setting it (the switch
# from a fixed count to an HPA); see `replicas_handover`.
HANDOVER_FIELD_MANAGER: Final = "dreambooth-operator-handover"


@dataclass(frozen=True)
class ServedModel:
    """What an InferenceService serves: a trained model's URI (from its job) or a base model spec (not the
    trainer's local weights folder, `dreambooth_trainer.components.ResolvedModel`)."""

    model_uri: str | None
    base_model: dict[str, Any] | None


def labels(isvc: Mapping[str, Any]) -> dict[str, str]:
    return {
        LABEL_INFERENCE_NAME: str(isvc["metadata"]["name"]),
        LABEL_COMPONENT: Component.INFERENCE.value,
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def serve_config(spec: InferenceServiceSpec, model: ServedModel) -> dict[str, Any]:
    """The sampling server's ServeConfig (DREAMBOOTH_SERVE_CONFIG)."""
    storage: dict[str, Any] = {"addressingStyle": spec.storage.addressing_style.value}
    if spec.storage.endpoint:
        storage["endpoint"] = spec.storage.endpoint
    if spec.storage.region:
        storage["region"] = spec.storage.region
    config: dict[str, Any] = {
        "adapters": [a.to_wire() for a in spec.adapters],
        "server": spec.server.to_wire(),
        "storage": storage,
    }
    if model.model_uri:
        config["modelUri"] = model.model_uri
    if model.base_model:
        config["baseModel"] = model.base_model
    if spec.subjects is not None:
        config["subjectsFile"] = SUBJECTS_FILE
    return config


def subjects_configmap_name(isvc: Mapping[str, Any]) -> str:
    return f"{isvc['metadata']['name']}-subjects"


def build_subjects_configmap(isvc: Mapping[str, Any], subjects: Mapping[str, str]) -> dict[str, Any]:
    """The ConfigMap of spec.subjects: `subjects.json` is the server's subjects file (sorted `{job: LoRA URI}`)."""
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": subjects_configmap_name(isvc), "labels": labels(isvc)},
        "data": {SUBJECTS_KEY: json.dumps(dict(subjects), sort_keys=True)},
    }
    kopf.adopt(configmap, owner=cast("kopf.Body", dict(isvc)))
    return configmap


def replicas(spec: InferenceServiceSpec) -> int:
    """The fixed number of replicas, or the fewest when autoscaling."""
    if spec.scaling.replicas is not None:
        return spec.scaling.replicas
    return spec.scaling.min_replicas or 1


def autoscaled(spec: InferenceServiceSpec) -> bool:
    """True when an HPA owns the replica count (maxReplicas above minReplicas)."""
    low, high = spec.scaling.min_replicas, spec.scaling.max_replicas
    return low is not None and high is not None and high > low


def applied_replicas(spec: InferenceServiceSpec, deployment: Mapping[str, Any] | None) -> int | None:
    """The spec.replicas of the operator's apply: the fixed count; when autoscaling, minReplicas for a Deployment
    that does not exist yet (or whose count the operator still sets, below minReplicas: an HPA never scales up
    from zero), else None: the field is left out, so that the apply never overwrites the HPA's count."""
    if not autoscaled(spec) or deployment is None:
        return replicas(spec)
    live = _live_replicas(deployment)
    if owns_replicas(deployment) and (live is None or live < replicas(spec)):
        return replicas(spec)
    return None


def _live_replicas(deployment: Mapping[str, Any]) -> int | None:
    live = (deployment.get("spec") or {}).get("replicas")
    return None if live is None else int(live)


def owns_replicas(deployment: Mapping[str, Any] | None, manager: str = FIELD_MANAGER) -> bool:
    """True when `manager`'s server-side apply owns the Deployment's spec.replicas (its managedFields entry)."""
    for entry in ((deployment or {}).get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") != manager or entry.get("operation") != "Apply":
            continue
        if "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {}):
            return True
    return False


def replicas_handover(spec: InferenceServiceSpec, deployment: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """When an HPA takes over a Deployment whose spec.replicas the operator's apply owns (it had a fixed count, or
    was created at minReplicas): the live count, to be applied by HANDOVER_FIELD_MANAGER before the operator's own
    apply leaves the field out. Without it, server-side apply would remove the field that its manager no longer
    sets, and the API server would default it to 1, stopping serving pods until the HPA scales up again.
    (Kubernetes' documented hand-over of a field: a second manager takes co-ownership first.)"""
    if deployment is None or applied_replicas(spec, deployment) is not None or not owns_replicas(deployment):
        return None
    live = _live_replicas(deployment)
    if live is None:
        return None
    meta = deployment["metadata"]
    handover: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": {"replicas": live},
    }
    if meta.get("uid"):  # a precondition: never applied to a same-named successor
        handover["metadata"]["uid"] = meta["uid"]
    return handover


def build_deployment(
    isvc: Mapping[str, Any],
    spec: InferenceServiceSpec,
    model: ServedModel,
    settings: OperatorSettings,
    replica_count: int | None,
) -> dict[str, Any]:
    """The serving Deployment; `replica_count` None leaves spec.replicas out of it (`applied_replicas`)."""
    name = str(isvc["metadata"]["name"])
    overrides = spec.pod_template
    env: list[dict[str, Any]] = [
        {"name": CONFIG_ENV, "value": json.dumps(serve_config(spec, model), sort_keys=True)},
        {"name": envnames.BIND_ADDRESS, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": envnames.SERVE_PORT, "value": str(SERVE_PORT)},
    ]
    cache_volumes, cache_mounts, cache_env = model_cache(settings)
    env += cache_env
    creds = spec.storage.credentials_secret
    if creds is not None:
        keys = [
            (envnames.AWS_ACCESS_KEY_ID, creds.access_key_id_key),
            (envnames.AWS_SECRET_ACCESS_KEY, creds.secret_access_key_key),
        ]
        if creds.session_token_key:  # temporary credentials, as for the training pods (builders.py)
            keys.append((envnames.AWS_SESSION_TOKEN, creds.session_token_key))
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": creds.name, "key": key}}} for var, key in keys]
    if spec.auth is not None:
        ref = spec.auth.bearer_token_secret
        env.append({"name": envnames.SERVE_TOKEN, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if overrides and overrides.env:
        env += [e.to_wire() for e in overrides.env]
    res = spec.resources
    resources = container_resources(res.cpu, res.memory, res.gpu_resource_name or settings.gpu_resource_name, res.gpus)
    pod_labels = {**(overrides.labels if overrides and overrides.labels else {}), **labels(isvc)}
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(settings),
        "containers": [
            {
                "name": CONTAINER,
                "image": overrides.image if overrides and overrides.image else settings.trainer_image,
                "command": ["dreambooth-serve"],
                "env": env,
                "ports": [{"name": "http", "containerPort": SERVE_PORT, "protocol": "TCP"}],
                # /healthz: alive (the model loads, or is loaded); /readyz: loaded and warmed up. The startup probe
                # gives a large model 30 minutes to download and load before liveness applies.
                "startupProbe": {
                    "httpGet": {"path": "/healthz", "port": "http"},
                    "periodSeconds": 5,
                    "failureThreshold": STARTUP_PROBE_FAILURES,
                },
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
                "resources": resources,
                "securityContext": dict(RESTRICTED_CONTAINER_SECURITY),
                # The server writes a failed load's error to the file; a crash before that leaves its log tail.
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
    }
    volumes, mounts = list(cache_volumes), list(cache_mounts)
    if spec.subjects is not None:
        # Optional: a pod starts (with no subjects) even before the ConfigMap exists; the kubelet fills it in later.
        volumes.append(
            {
                "name": SUBJECTS_VOLUME,
                "configMap": {"name": subjects_configmap_name(isvc), "optional": True},
            }
        )
        mounts.append({"name": SUBJECTS_VOLUME, "mountPath": SUBJECTS_DIR, "readOnly": True})
    if res.shared_memory is not None:
        shm_volume, shm_mount = shared_memory_volume(res.shared_memory)
        volumes.insert(0, shm_volume)
        mounts.insert(0, shm_mount)
    if volumes:
        pod_spec["containers"][0]["volumeMounts"] = mounts
        pod_spec["volumes"] = volumes
    apply_scheduling_overrides(pod_spec, overrides)
    template: dict[str, Any] = {"metadata": {"labels": pod_labels}, "spec": pod_spec}
    if overrides and overrides.annotations:
        template["metadata"]["annotations"] = dict(overrides.annotations)
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels(isvc)},
        "spec": {
            "selector": {"matchLabels": {LABEL_INFERENCE_NAME: name}},
            "template": template,
        },
    }
    if replica_count is not None:
        deployment["spec"]["replicas"] = replica_count
    kopf.adopt(deployment, owner=cast("kopf.Body", dict(isvc)))
    return deployment


def build_hpa(isvc: Mapping[str, Any], spec: InferenceServiceSpec) -> dict[str, Any]:
    """An autoscaling/v2 HPA that keeps the average in-flight requests per replica at the target."""
    name = str(isvc["metadata"]["name"])
    target = spec.scaling.target_inflight_requests or DEFAULT_TARGET_INFLIGHT
    hpa = {
        "apiVersion": HPA_API_VERSION,
        "kind": HPA_KIND,
        "metadata": {"name": name, "labels": labels(isvc)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": spec.scaling.min_replicas,
            "maxReplicas": spec.scaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": INFLIGHT_METRIC},
                        "target": {"type": "AverageValue", "averageValue": str(target)},
                    },
                }
            ],
        },
    }
    kopf.adopt(hpa, owner=cast("kopf.Body", dict(isvc)))
    return hpa


def build_service(isvc: Mapping[str, Any]) -> dict[str, Any]:
    name = str(isvc["metadata"]["name"])
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels(isvc)},
        "spec": {
            "selector": {LABEL_INFERENCE_NAME: name},
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    kopf.adopt(service, owner=cast("kopf.Body", dict(isvc)))
    return service

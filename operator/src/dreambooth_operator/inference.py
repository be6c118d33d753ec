"""InferenceService: pure builders (Deployment + Service running `dreambooth-serve`) and the pure reconcile.

`spec.model.fromJob` resolves to the job's `status.outputs.modelUri` and its `spec.baseModel` once the job has
succeeded; until then the service is Pending (WaitingForJob), and Failed when the job failed or is missing.
It is Ready only when every ready replica runs the desired server config (no old replicas left); while a rollout
is under way it is Loading (RollingOut) and `servedModelUri` names the model the old replicas still serve.
A server that cannot load its model exits with the error as its termination message; with no replica ready the
service is then Failed (ModelLoadFailed) with that message, until a replica loads.
With autoscaling (maxReplicas above minReplicas) an HPA owns the Deployment's replica count: the operator sets it
only when it creates the Deployment (to minReplicas), and hands the field over when a fixed count was set before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, cast

import kopf
from pydantic import ValidationError

from dreambooth_api.common import Condition, find_condition, set_condition
from dreambooth_api.constants import (
    LABEL_COMPONENT,
    LABEL_INFERENCE_NAME,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    Component,
    ConditionStatus,
    InferenceConditionType,
    InferencePhase,
    Reason,
)
from dreambooth_api.inference import InferenceServiceSpec, InferenceServiceStatus
from dreambooth_operator.builders import (
    RESTRICTED_CONTAINER_SECURITY,
    apply_scheduling_overrides,
    container_resources,
    model_cache,
    pod_security_context,
    shared_memory_volume,
)
from dreambooth_operator.kube import FIELD_MANAGER
from dreambooth_operator.settings import OperatorSettings

SERVE_PORT: Final = 8080
SERVICE_PORT: Final = 80
CONTAINER: Final = "server"
CONFIG_ENV: Final = "DREAMBOOTH_SERVE_CONFIG"
# The sampling server's gauge (trainer serve.py INFLIGHT); the HPA reads it through a custom metrics adapter.
INFLIGHT_METRIC: Final = "dreambooth_serve_inflight_requests"
DEFAULT_TARGET_INFLIGHT: Final = 2
HPA_API_VERSION: Final = "autoscaling/v2"
HPA_KIND: Final = "HorizontalPodAutoscaler"
# The field manager that keeps a Deployment's spec.replicas when the operator's apply stops setting it (the switch
# from a fixed count to an HPA); see `replicas_handover`.
HANDOVER_FIELD_MANAGER: Final = "dreambooth-operator-handover"


@dataclass(frozen=True)
class ResolvedModel:
    model_uri: str | None
    base_model: dict[str, Any] | None


def resolve_model(
    spec: InferenceServiceSpec, source: Mapping[str, Any] | None
) -> tuple[ResolvedModel | None, str, str]:
    """(model, reason, message): the model when known, else why not."""
    if spec.model.model_uri is not None:
        return ResolvedModel(spec.model.model_uri, spec.model.base_model), Reason.MODEL_URI_SET, "modelUri is set"
    job_name = spec.model.from_job
    if source is None:
        return None, Reason.SOURCE_JOB_NOT_FOUND, f"DreamBoothJob {job_name} not found"
    status = source.get("status") or {}
    phase = status.get("phase")
    if phase == "Failed":
        return None, Reason.SOURCE_JOB_FAILED, f"DreamBoothJob {job_name} failed: {status.get('message') or ''}"
    model_uri = (status.get("outputs") or {}).get("modelUri")
    if phase != "Succeeded" or not model_uri:
        return None, Reason.WAITING_FOR_JOB, f"waiting for DreamBoothJob {job_name} to succeed (phase {phase})"
    base = (source.get("spec") or {}).get("baseModel")
    return ResolvedModel(model_uri, base), Reason.MODEL_URI_SET, f"the model of DreamBoothJob {job_name}"


def labels(isvc: Mapping[str, Any]) -> dict[str, str]:
    return {
        LABEL_INFERENCE_NAME: str(isvc["metadata"]["name"]),
        LABEL_COMPONENT: Component.INFERENCE.value,
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def serve_config(spec: InferenceServiceSpec, model: ResolvedModel) -> dict[str, Any]:
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
    return config


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
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": {"replicas": live},
    }


def build_deployment(
    isvc: Mapping[str, Any],
    spec: InferenceServiceSpec,
    model: ResolvedModel,
    settings: OperatorSettings,
    replica_count: int | None,
) -> dict[str, Any]:
    """The serving Deployment; `replica_count` None leaves spec.replicas out of it (`applied_replicas`)."""
    name = str(isvc["metadata"]["name"])
    overrides = spec.pod_template
    env: list[dict[str, Any]] = [
        {"name": CONFIG_ENV, "value": json.dumps(serve_config(spec, model), sort_keys=True)},
        {"name": "DREAMBOOTH_BIND_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "DREAMBOOTH_SERVE_PORT", "value": str(SERVE_PORT)},
    ]
    cache_volumes, cache_mounts, cache_env = model_cache(settings)
    env += cache_env
    creds = spec.storage.credentials_secret
    if creds is not None:
        for var, key in (
            ("AWS_ACCESS_KEY_ID", creds.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", creds.secret_access_key_key),
        ):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": creds.name, "key": key}}})
    if spec.auth is not None:
        ref = spec.auth.bearer_token_secret
        env.append(
            {"name": "DREAMBOOTH_SERVE_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
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
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
                "resources": resources,
                "securityContext": dict(RESTRICTED_CONTAINER_SECURITY),
                # The server writes a failed load's error to the file; a crash before that leaves its log tail.
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
    }
    volumes, mounts = list(cache_volumes), list(cache_mounts)
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


def _server_fingerprint(deployment: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(image, serve config) of the server container: what decides which model and code a pod serves."""
    containers = ((deployment.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
    server: Mapping[str, Any] = next((c for c in containers if c.get("name") == CONTAINER), {})
    config = next((e.get("value") for e in server.get("env") or [] if e.get("name") == CONFIG_ENV), None)
    return server.get("image"), config


def _config_model_uri(deployment: Mapping[str, Any]) -> str | None:
    config = _server_fingerprint(deployment)[1]
    try:
        uri = json.loads(config).get("modelUri") if config else None
    except (ValueError, AttributeError):
        return None
    return uri if isinstance(uri, str) else None


@dataclass(frozen=True)
class Rollout:
    """The observed Deployment's rollout, compared with the Deployment the operator wants."""

    replicas: int
    """Pods that exist, old and new."""
    ready: int
    desired: int
    """The Deployment's spec.replicas (chosen by the HPA when autoscaling)."""
    complete: bool
    """The controller has seen the latest spec and no pods of an older template remain."""
    current: bool
    """Complete, and the template runs the wanted server image and config."""
    model_uri: str | None
    """The model in the observed template's config."""


def observe_rollout(deployment: Mapping[str, Any] | None, wanted: Mapping[str, Any], default_replicas: int) -> Rollout:
    if deployment is None:
        return Rollout(0, 0, default_replicas, complete=False, current=False, model_uri=None)
    status = deployment.get("status") or {}
    count = int(status.get("replicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    desired = (deployment.get("spec") or {}).get("replicas")
    desired = default_replicas if desired is None else int(desired)
    generation = int((deployment.get("metadata") or {}).get("generation") or 0)
    observed = int(status.get("observedGeneration") or 0)
    complete = observed >= generation and updated == count and updated >= desired
    current = complete and _server_fingerprint(deployment) == _server_fingerprint(wanted)
    ready = int(status.get("readyReplicas") or 0)
    return Rollout(count, ready, desired, complete, current, _config_model_uri(deployment))


@dataclass
class InferencePlan:
    status: InferenceServiceStatus
    children: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    stale: list[tuple[str, str, str]] = field(default_factory=list)
    """(apiVersion, kind, name) of children to delete when they exist (an HPA after autoscaling was turned off)."""
    handover: dict[str, Any] | None = None
    """To apply as HANDOVER_FIELD_MANAGER, before the children (`replicas_handover`)."""


def load_failure(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The newest load error of the server containers: the termination message of a failed run (the server's
    JSON `message`, or the log tail), or None when no server container failed."""
    newest: tuple[str, str] | None = None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != CONTAINER:
                continue
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                term = state.get("terminated") or {}
                if int(term.get("exitCode") or 0) == 0:
                    continue
                at = str(term.get("finishedAt") or "")
                if newest is None or at > newest[0]:
                    newest = (at, _termination_text(term))
    return None if newest is None else newest[1]


def _termination_text(terminated: Mapping[str, Any]) -> str:
    text = str(terminated.get("message") or "").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("message"):
        return str(doc["message"])
    return text or f"exit code {terminated.get('exitCode')} ({terminated.get('reason') or 'Error'})"


def reconcile_inference(
    isvc: Mapping[str, Any],
    source_job: Mapping[str, Any] | None,
    deployment: Mapping[str, Any] | None,
    settings: OperatorSettings,
    now: datetime,
    pods: Sequence[Mapping[str, Any]] = (),
) -> InferencePlan:
    meta = isvc["metadata"]
    generation = meta.get("generation")
    try:
        prev = InferenceServiceStatus.model_validate(isvc.get("status") or {})
    except ValidationError:
        prev = InferenceServiceStatus()
    status = prev.model_copy(deep=True)
    status.observed_generation = generation
    plan = InferencePlan(status=status)
    try:
        spec = InferenceServiceSpec.model_validate(isvc.get("spec") or {})
    except ValidationError as err:
        status.phase = InferencePhase.FAILED
        status.message = f"invalid spec: {err.error_count()} error(s): " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        plan.events.append(("Warning", Reason.INVALID_SPEC, status.message))
        return plan

    def cond(type_: InferenceConditionType, ok: bool, reason: str, message: str) -> None:
        new = Condition(
            type=type_.value,
            status=ConditionStatus.TRUE if ok else ConditionStatus.FALSE,
            reason=reason,
            message=message,
            last_transition_time=now,
            observed_generation=generation,
        )
        old = find_condition(status.conditions, type_.value)
        if old is None or old.status != new.status or old.reason != new.reason:
            warn = reason in (Reason.SOURCE_JOB_FAILED, Reason.SOURCE_JOB_NOT_FOUND, Reason.MODEL_LOAD_FAILED)
            plan.events.append(("Warning" if warn else "Normal", reason, message))
        status.conditions = set_condition(status.conditions, new)

    model, reason, message = resolve_model(spec, source_job)
    cond(InferenceConditionType.MODEL_RESOLVED, model is not None, reason, message)
    if model is None:
        failed = reason in (Reason.SOURCE_JOB_FAILED, Reason.SOURCE_JOB_NOT_FOUND)
        status.phase = InferencePhase.FAILED if failed else InferencePhase.PENDING
        status.message = message
        cond(InferenceConditionType.READY, False, reason, message)
        return plan
    status.model_uri = model.model_uri
    wanted = build_deployment(isvc, spec, model, settings, applied_replicas(spec, deployment))
    plan.children = [wanted, build_service(isvc)]
    plan.handover = replicas_handover(spec, deployment)
    if autoscaled(spec):
        plan.children.append(build_hpa(isvc, spec))
    else:
        plan.stale.append((HPA_API_VERSION, HPA_KIND, str(meta["name"])))
    rollout = observe_rollout(deployment, wanted, replicas(spec))
    want = rollout.desired if autoscaled(spec) else replicas(spec)
    status.replicas = rollout.replicas
    status.ready_replicas = rollout.ready
    status.url = f"http://{meta['name']}.{meta['namespace']}.svc:{SERVICE_PORT}"
    status.served_model_uri = served_model_uri(rollout, prev.served_model_uri)
    status.phase, ok, reason, status.message = readiness(rollout, want, model.model_uri, status, load_failure(pods))
    cond(InferenceConditionType.READY, ok, reason, status.message)
    return plan


def readiness(
    rollout: Rollout, want: int, model_uri: str | None, status: InferenceServiceStatus, failure: str | None = None
) -> tuple[InferencePhase, bool, str, str]:
    """(phase, Ready, reason, message). Ready only when no replica of an older template is left; `failure` is a
    server's load error (`load_failure`)."""
    if want == 0:
        return InferencePhase.READY, False, Reason.SCALED_TO_ZERO, "scaled to zero"
    if rollout.current and rollout.ready > 0:
        message = f"{rollout.ready}/{want} replicas ready at {status.url}"
        return InferencePhase.READY, True, Reason.REPLICAS_READY, message
    if rollout.ready > 0:
        old = status.served_model_uri or "the previous model"
        message = f"rolling out {model_uri}: {rollout.ready} ready, old replicas still serve {old}"
        if failure:
            message += f"; a new replica failed to load the model: {failure}"
        return InferencePhase.LOADING, False, Reason.ROLLING_OUT, message
    if failure:
        return InferencePhase.FAILED, False, Reason.MODEL_LOAD_FAILED, f"the server failed to load the model: {failure}"
    return InferencePhase.LOADING, False, Reason.REPLICAS_NOT_READY, f"0/{want} replicas ready; loading the model"


def served_model_uri(rollout: Rollout, previous: str | None) -> str | None:
    """The model the ready replicas serve: a complete rollout's own; mid-rollout, the one reported before."""
    if rollout.ready == 0:
        return None
    return rollout.model_uri if rollout.complete else previous

"""InferenceService handlers: one reconcile loop per service (lower volume than jobs; it reads its source job,
Deployment, serving pods and the jobs its `spec.subjects` selects directly), woken by changes to the service, its
Deployment, its pods, its source job's end (jobs.py), or, with `spec.subjects`, the end of any job in its namespace
(`wake_subject_services`)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client
from pydantic import ValidationError

from dreambooth_api.constants import (
    GROUP,
    INFERENCE_KIND,
    INFERENCE_PLURAL,
    JOB_KIND,
    JOB_PLURAL,
    LABEL_INFERENCE_NAME,
    TERMINAL_JOB_PHASES,
    VERSION,
)
from dreambooth_api.inference import LabelSelector
from dreambooth_operator import kube, networkpolicies
from dreambooth_operator.handlers.loop import LoopKind, Pass, report_field_conflict, run_loop
from dreambooth_operator.handlers.state import OperatorState, inference_key, state_of
from dreambooth_operator.inference import reconcile_inference
from dreambooth_operator.inference_builders import (
    HANDOVER_FIELD_MANAGER,
    HPA_API_VERSION,
    HPA_KIND,
    subjects_configmap_name,
)
from dreambooth_operator.observed import now_utc

SERVING_LABELS = {LABEL_INFERENCE_NAME: kopf.PRESENT}
INFERENCE_LOOP = LoopKind(
    name="InferenceService reconcile",
    retryable=(client.ApiException, OSError, kube.ForeignChildError, kube.FieldConflictError),
)


@kopf.index(GROUP, VERSION, INFERENCE_PLURAL)
def services_by_source_job(*, namespace: str | None, name: str | None, spec: kopf.Spec, **_: Any) -> Any:
    """InferenceServices that serve a DreamBoothJob's model (model.fromJob), by (namespace, job name)."""
    job = (spec.get("model") or {}).get("fromJob")
    return {(namespace, job): name} if job else None


@kopf.index(GROUP, VERSION, INFERENCE_PLURAL)
def services_with_subjects(*, namespace: str | None, name: str | None, spec: kopf.Spec, **_: Any) -> Any:
    """InferenceServices with spec.subjects (a label selector over the namespace's jobs), by namespace."""
    return {namespace: name} if spec.get("subjects") is not None else None


@kopf.on.event(GROUP, VERSION, JOB_PLURAL)
def wake_subject_services(*, namespace: str | None, memo: Any, type: str, status: kopf.Status, **kwargs: Any) -> None:
    """A job in the namespace ended (or went): every service with spec.subjects reconciles, so that a newly
    succeeded job that its selector matches is published at once (a terminal job's later changes, such as a new
    label or a QualityGateFailed condition, wake them too)."""
    services: kopf.Index[str | None, str] = kwargs["services_with_subjects"]
    if type != "DELETED" and status.get("phase") not in TERMINAL_JOB_PHASES:
        return
    state = state_of(memo)
    for service in services.get(namespace, []):
        state.wake(inference_key(namespace, service))


@kopf.on.event("apps", "v1", "deployments", labels=SERVING_LABELS)
def wake_on_deployment(*, namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any) -> None:
    state_of(memo).wake(inference_key(namespace, labels[LABEL_INFERENCE_NAME]))


@kopf.on.event("v1", "pods", labels=SERVING_LABELS)
def wake_on_serving_pod(*, namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any) -> None:
    """A serving pod changed (for example its server exited on a failed model load): reconcile its service now,
    not at the next periodic reconcile. (The same pods watch as the training pods', filtered by label.)"""
    state_of(memo).wake(inference_key(namespace, labels[LABEL_INFERENCE_NAME]))


@kopf.on.event(GROUP, VERSION, INFERENCE_PLURAL)
def wake_on_inference(*, namespace: str | None, name: str | None, memo: Any, **_: Any) -> None:
    state_of(memo).wake(inference_key(namespace, name))


@kopf.daemon(GROUP, VERSION, INFERENCE_PLURAL, cancellation_timeout=5.0)
async def inference_loop(
    *,
    body: kopf.Body,
    namespace: str | None,
    name: str | None,
    stopped: kopf.DaemonStopped,
    memo: Any,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Resolve the model, apply the Deployment and Service, and report readiness, until deleted."""
    state = state_of(memo)

    key = inference_key(namespace, name)

    async def once() -> Pass:
        try:
            events = await asyncio.to_thread(reconcile_inference_once, state, body)
        except kube.FieldConflictError as err:
            report_field_conflict(state, key, body, err)
            raise
        state.conflicts.pop(key, None)
        # Events only after the status write (inside reconcile_inference_once) succeeded.
        for type_, reason, message in events:
            kopf.event(body, type=type_, reason=reason, message=message[:1024])
        return Pass()

    await run_loop(state, key, INFERENCE_LOOP, once, stopped, logger)


# The children besides the Deployment, read before each reconcile to check who controls them.
OTHER_CHILDREN = (
    ("v1", "Service"),
    (HPA_API_VERSION, HPA_KIND),
    (networkpolicies.API_VERSION, networkpolicies.KIND),
)


def reconcile_inference_once(state: OperatorState, body: kopf.Body) -> list[tuple[str, str, str]]:
    isvc = copy.deepcopy(dict(body))
    meta = isvc["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], str(meta.get("uid") or "")
    api_version = f"{GROUP}/{VERSION}"
    source_name = ((isvc.get("spec") or {}).get("model") or {}).get("fromJob")
    source = kube.get(state.api, api_version, JOB_KIND, namespace, source_name) if source_name else None
    deployment = kube.get(state.api, "apps/v1", "Deployment", namespace, name)
    children = {(kind, name): kube.get(state.api, version, kind, namespace, name) for version, kind in OTHER_CHILDREN}
    subject_jobs = []
    selector = subjects_selector(isvc)
    if selector is not None:
        configmap = subjects_configmap_name(isvc)
        children[("ConfigMap", configmap)] = kube.get(state.api, "v1", "ConfigMap", namespace, configmap)
        subject_jobs = kube.list_labelled(state.api, api_version, JOB_KIND, namespace, selector.to_query())
    # The serving pods, for a failed model load's termination message.
    pods = kube.list_labelled(state.api, "v1", "Pod", namespace, f"{LABEL_INFERENCE_NAME}={name}")
    plan = reconcile_inference(isvc, source, deployment, state.settings, now_utc(), pods, children, subject_jobs)
    # Stale children first: a leftover HPA must not rescale the Deployment after the fixed count is applied.
    for stale_version, kind, child_name in plan.stale:  # e.g. the HPA once autoscaling is off; only the service's own
        kube.delete_owned(state.api, stale_version, kind, namespace, child_name, uid)
    if plan.handover is not None:
        # The live spec.replicas, applied by a second manager that then co-owns the field. Not forced: should the
        # HPA have changed the count since the Deployment was read, this conflicts (409) and the reconcile fails
        # before the operator's own apply; the next one sees that the HPA owns the field. (With the Deployment's
        # uid in the body: never applied to another Deployment.)
        kube.apply(state.api, plan.handover, manager=HANDOVER_FIELD_MANAGER, force=False)
    for child in plan.children:
        # Only the Deployment's apply is forced, on the service's own Deployment: it takes spec.replicas back from
        # the HPA's controller when autoscaling is turned off (or from `kubectl scale` while the count is fixed),
        # and the pod template back from hand edits. Any other child's field that another manager changed is a
        # conflict (kube.FieldConflictError), reported and not overwritten.
        # Read first: after the first reconcile they exist, and a create of an existing one would be a request more.
        kube.ensure_child(state.api, child, isvc, force=child["kind"] == "Deployment", read_first=True)
    patch = kube.merge_diff(isvc.get("status"), plan.status.to_wire(), keep=frozenset({"kopf"}))
    if patch:
        kube.patch_status(state.api, namespace, name, patch, kind=INFERENCE_KIND)
    return plan.events


def subjects_selector(isvc: Mapping[str, Any]) -> LabelSelector | None:
    """spec.subjects, or None when unset or invalid (the reconcile reports an invalid spec)."""
    raw = (isvc.get("spec") or {}).get("subjects")
    if raw is None:
        return None
    try:
        return LabelSelector.model_validate(raw)
    except ValidationError:
        return None

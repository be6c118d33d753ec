"""InferenceService: the pure reconcile (the builders are in inference_builders.py).

`spec.model.fromJob` resolves to the job's `status.outputs.modelUri` and its `spec.baseModel` once the job has
succeeded; until then the service is Pending (WaitingForJob), also while the job does not exist (yet): it may be
created after the service, and the service recovers by itself. Failed (SourceJobFailed) only when the job failed.
It is Ready only when every ready replica runs the desired server config (no old replicas left); while a rollout
is under way it is Loading (RollingOut) and `servedModelUri` names the model the old replicas still serve.
A server that cannot load its model exits with the error as its termination message; with no replica ready the
service is then Failed (ModelLoadFailed) with that message, until a replica loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

from dreambooth_api.common import DNS_LABEL_PATTERN, Condition, find_condition, set_condition
from dreambooth_api.constants import ConditionStatus, InferenceConditionType, InferencePhase, Reason
from dreambooth_api.inference import InferenceServiceSpec, InferenceServiceStatus, LabelSelector
from dreambooth_operator.inference_builders import (
    CONFIG_ENV,
    CONTAINER,
    HPA_API_VERSION,
    HPA_KIND,
    SERVICE_PORT,
    ServedModel,
    applied_replicas,
    autoscaled,
    build_deployment,
    build_hpa,
    build_service,
    build_subjects_configmap,
    replicas,
    replicas_handover,
)
from dreambooth_operator.networkpolicies import KIND as NETWORK_POLICY_KIND
from dreambooth_operator.networkpolicies import build_inference_network_policy
from dreambooth_operator.ownership import ObservedChildren, conflicts_message, foreign_children
from dreambooth_operator.redact import redact
from dreambooth_operator.restrictions import violations
from dreambooth_operator.settings import OperatorSettings

SOURCE_JOB_FAILED_HINT: Final = "train it again (a new job, or this one recreated), or set spec.model to another model"


def resolve_model(spec: InferenceServiceSpec, source: Mapping[str, Any] | None) -> tuple[ServedModel | None, str, str]:
    """(model, reason, message): the model when known, else why not."""
    if spec.model.model_uri is not None:
        return ServedModel(spec.model.model_uri, spec.model.base_model), Reason.MODEL_URI_SET, "modelUri is set"
    job_name = spec.model.from_job
    if source is None:
        message = f"DreamBoothJob {job_name} does not exist (yet); the service starts once it exists and succeeds"
        return None, Reason.WAITING_FOR_JOB, message
    status = source.get("status") or {}
    phase = status.get("phase")
    if phase == "Failed":
        message = f"DreamBoothJob {job_name} failed: {status.get('message') or ''}; {SOURCE_JOB_FAILED_HINT}"
        return None, Reason.SOURCE_JOB_FAILED, message
    model_uri = (status.get("outputs") or {}).get("modelUri")
    if phase != "Succeeded" or not model_uri:
        message = f"waiting for DreamBoothJob {job_name} to succeed (phase {phase or 'not set yet'})"
        return None, Reason.WAITING_FOR_JOB, message
    base = (source.get("spec") or {}).get("baseModel")
    return ServedModel(model_uri, base), Reason.MODEL_URI_SET, f"the model of DreamBoothJob {job_name}"


QUALITY_GATE_FAILED: Final = "QualityGateFailed"
"""A DreamBoothJob condition: True when the job succeeded but its quality gate failed (never served)."""
_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)


def lora_uri(job: Mapping[str, Any]) -> str | None:
    """The LoRA weights folder of a job that exports the lora format: `<output.uri>/lora` (the storage layout of
    docs/contracts.md), or its `status.outputs.modelUri` when that is the LoRA folder itself (LoRA-only output)."""
    output = (job.get("spec") or {}).get("output") or {}
    model_uri = str(((job.get("status") or {}).get("outputs") or {}).get("modelUri") or "")
    if model_uri.rstrip("/").endswith("/lora"):
        return model_uri.rstrip("/")
    if "lora" in (output.get("formats") or []) and output.get("uri"):
        return f"{str(output['uri']).rstrip('/')}/lora"
    return None


def servable_subjects(selector: LabelSelector, jobs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """{job name: LoRA URI} of the jobs that match `selector`, Succeeded, with a LoRA output, a name that is a DNS
    label (a subject's name) and no QualityGateFailed condition that is True."""
    subjects: dict[str, str] = {}
    for job in jobs:
        meta, status = job.get("metadata") or {}, job.get("status") or {}
        name = str(meta.get("name") or "")
        if not _DNS_LABEL.fullmatch(name) or len(name) > 63 or meta.get("deletionTimestamp"):
            continue
        if not selector.matches(dict(meta.get("labels") or {})) or status.get("phase") != "Succeeded":
            continue
        conditions = status.get("conditions") or []
        if any(c.get("type") == QUALITY_GATE_FAILED and c.get("status") == "True" for c in conditions):
            continue
        uri = lora_uri(job)
        if uri:
            subjects[name] = uri
    return dict(sorted(subjects.items()))


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
    """(apiVersion, kind, name) of children to delete when they exist and the service controls them (an HPA after
    autoscaling was turned off)."""
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
        text = str(doc["message"])
    # A crash's message is the server's log tail (FallbackToLogsOnError): no credentials into status and events.
    return redact(text) or f"exit code {terminated.get('exitCode')} ({terminated.get('reason') or 'Error'})"


def reconcile_inference(
    isvc: Mapping[str, Any],
    source_job: Mapping[str, Any] | None,
    deployment: Mapping[str, Any] | None,
    settings: OperatorSettings,
    now: datetime,
    pods: Sequence[Mapping[str, Any]] = (),
    children: ObservedChildren | None = None,
    subject_jobs: Sequence[Mapping[str, Any]] = (),
) -> InferencePlan:
    """The next status and the children to apply. `children`: the Service, HPA, NetworkPolicy and subjects
    ConfigMap as read, by (kind, name) (the Deployment is `deployment`); a child's name taken by an object the
    service does not control stops every apply (condition ChildConflict). `subject_jobs`: the DreamBoothJobs of the
    namespace that spec.subjects may choose from (`servable_subjects` filters them). status.reason (the Reason
    column) is the Ready condition's reason, which every outcome sets."""
    plan = _plan(isvc, source_job, deployment, settings, now, pods, children, subject_jobs)
    ready = find_condition(plan.status.conditions, InferenceConditionType.READY.value)
    plan.status.reason = ready.reason if ready is not None else None
    return plan


def _plan(
    isvc: Mapping[str, Any],
    source_job: Mapping[str, Any] | None,
    deployment: Mapping[str, Any] | None,
    settings: OperatorSettings,
    now: datetime,
    pods: Sequence[Mapping[str, Any]],
    children: ObservedChildren | None,
    subject_jobs: Sequence[Mapping[str, Any]],
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
        status.message += "; fix the spec and apply it again"
        set_condition_of(
            plan, InferenceConditionType.READY, False, Reason.INVALID_SPEC, status.message, now, generation
        )
        return plan

    def cond(type_: InferenceConditionType, ok: bool, reason: str, message: str, event: bool = True) -> None:
        set_condition_of(plan, type_, ok, reason, message, now, generation, event=event)

    broken = violations(spec.pod_template, settings.rules_for(str(meta.get("namespace") or "")))
    if broken:
        status.phase = InferencePhase.FAILED
        status.message = "; ".join(broken)
        cond(InferenceConditionType.READY, False, Reason.POLICY_VIOLATION, status.message)
        return plan

    model, reason, message = resolve_model(spec, source_job)
    cond(InferenceConditionType.MODEL_RESOLVED, model is not None, reason, message)
    if model is None:
        # Only a failed job needs a person; a missing or unfinished one is waited for.
        status.phase = InferencePhase.FAILED if reason == Reason.SOURCE_JOB_FAILED else InferencePhase.PENDING
        status.message = message
        cond(InferenceConditionType.READY, False, reason, message)
        return plan
    status.model_uri = model.model_uri
    observed = {("Deployment", str(meta["name"])): deployment, **(children or {})}
    if blocked_by_foreign_children(plan, isvc, applied_children(observed, spec, settings), now):
        return plan
    wanted = build_deployment(isvc, spec, model, settings, applied_replicas(spec, deployment))
    plan.children = [wanted, build_service(isvc)]
    plan.handover = replicas_handover(spec, deployment)
    if autoscaled(spec):
        plan.children.append(build_hpa(isvc, spec))
    else:
        plan.stale.append((HPA_API_VERSION, HPA_KIND, str(meta["name"])))
    if settings.network_policies:
        plan.children.append(build_inference_network_policy(isvc, settings))
    publish_subjects(plan, isvc, spec, subject_jobs)
    rollout = observe_rollout(deployment, wanted, replicas(spec))
    want = rollout.desired if autoscaled(spec) else replicas(spec)
    status.replicas, status.ready_replicas = rollout.replicas, rollout.ready
    status.url = f"http://{meta['name']}.{meta['namespace']}.svc:{SERVICE_PORT}"
    status.served_model_uri = served_model_uri(rollout, prev.served_model_uri)
    status.phase, ok, reason, status.message = readiness(rollout, want, model.model_uri, status, load_failure(pods))
    cond(InferenceConditionType.READY, ok, reason, status.message)
    return plan


def publish_subjects(
    plan: InferencePlan, isvc: Mapping[str, Any], spec: InferenceServiceSpec, jobs: Sequence[Mapping[str, Any]]
) -> None:
    """With spec.subjects: the subjects ConfigMap among the children, and status.subjects its count."""
    if spec.subjects is None:
        plan.status.subjects = None
        return
    subjects = servable_subjects(spec.subjects, jobs)
    plan.children.append(build_subjects_configmap(isvc, subjects))
    plan.status.subjects = len(subjects)


def set_condition_of(
    plan: InferencePlan,
    type_: InferenceConditionType,
    ok: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
    *,
    event: bool = True,
) -> None:
    """Set a condition of the plan's status (redacted); an event when its status or reason changes, one per reason
    and reconcile (ModelResolved and Ready that change with one reason are one transition)."""
    message = redact(message)
    new = Condition(
        type=type_.value,
        status=ConditionStatus.TRUE if ok else ConditionStatus.FALSE,
        reason=reason,
        message=message,
        last_transition_time=now,
        observed_generation=generation,
    )
    old = find_condition(plan.status.conditions, type_.value)
    changed = old is None or old.status != new.status or old.reason != new.reason
    if event and changed and all(r != reason for _, r, _ in plan.events):
        plan.events.append(("Warning" if reason in WARNING_REASONS else "Normal", reason, message))
    plan.status.conditions = set_condition(plan.status.conditions, new)


def applied_children(
    observed: ObservedChildren, spec: InferenceServiceSpec, settings: OperatorSettings
) -> ObservedChildren:
    """The observed children of the kinds the service applies: a foreign HPA of its name is no conflict while
    autoscaling is off (a stale HPA is deleted only when it is the service's own), nor a NetworkPolicy while they
    are turned off."""
    kinds = {"Deployment", "Service"} | ({HPA_KIND} if autoscaled(spec) else set())
    kinds |= {"ConfigMap"} if spec.subjects is not None else set()
    kinds |= {NETWORK_POLICY_KIND} if settings.network_policies else set()
    return {key: obj for key, obj in observed.items() if key[0] in kinds}


def blocked_by_foreign_children(
    plan: InferencePlan, isvc: Mapping[str, Any], observed: ObservedChildren, now: datetime
) -> bool:
    """True when an object the service does not control holds a child's name: nothing is applied, the service is
    Pending with condition ChildConflict (or waits for an earlier service's leftovers to be garbage-collected)."""
    status, generation = plan.status, isvc["metadata"].get("generation")
    taken = foreign_children(observed, isvc)
    if not taken:
        if find_condition(status.conditions, InferenceConditionType.CHILD_CONFLICT.value) is not None:
            message = "every child is the service's own"
            set_condition_of(
                plan, InferenceConditionType.CHILD_CONFLICT, False, Reason.CONFLICT_RESOLVED, message, now, generation
            )
        return False
    status.phase = InferencePhase.PENDING
    status.message = conflicts_message(taken)
    if any(not (f.leftover or f.deleting) for f in taken):
        set_condition_of(
            plan, InferenceConditionType.CHILD_CONFLICT, True, Reason.CHILD_CONFLICT, status.message, now, generation
        )
    # One event for the conflict (the ChildConflict condition's), none for Ready's reason.
    set_condition_of(
        plan, InferenceConditionType.READY, False, Reason.CHILD_CONFLICT, status.message, now, generation, event=False
    )
    return True


WARNING_REASONS = frozenset(
    {
        Reason.INVALID_SPEC,
        Reason.SOURCE_JOB_FAILED,
        Reason.MODEL_LOAD_FAILED,
        Reason.CHILD_CONFLICT,
        Reason.POLICY_VIOLATION,
    }
)


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

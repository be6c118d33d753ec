"""Thin kopf handlers: observe (indexes), reconcile (pure), act (kube.py), write status once, then events.

Shape: one kopf daemon per DreamBoothJob runs its reconcile loop, so exactly one writer updates each job and
reconciles never race. The loop wakes when the job or one of its batch Jobs or pods changes (event handlers
poke it), and at least every `reconcile_interval_seconds` (to poll rank 0's /progress and to honour deadlines
and TTLs). The children are observed through kopf indexes (in-memory, kept current by watches), so a
reconcile lists nothing. The startup handler that holds every kopf setting is in `main.py`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf
from kubernetes import client

from dreambooth_api.constants import (
    GROUP,
    INFERENCE_PLURAL,
    JOB_PLURAL,
    LABEL_ATTEMPT,
    LABEL_INFERENCE_NAME,
    LABEL_JOB_NAME,
    TERMINAL_JOB_PHASES,
    VERSION,
    JobPhase,
)
from dreambooth_operator import kube, names, podstate
from dreambooth_operator.builders import build_batch_job, build_configmap, build_service
from dreambooth_operator.inference import HANDOVER_FIELD_MANAGER, reconcile_inference
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.reconcile import (
    COUNTED_PODS_ANNOTATION,
    ActionKind,
    Observed,
    Plan,
    ProgressSample,
    now_utc,
    owned_batch_jobs,
    parse_status,
    reconcile,
)
from dreambooth_operator.settings import OperatorSettings

CHILD_LABELS = {LABEL_JOB_NAME: kopf.PRESENT}
Key = tuple[str, str]
# How long a reconcile waits for a /progress answer before going on with the last sample.
PROGRESS_WAIT_SECONDS = 0.5


@dataclass
class OperatorState:
    """What the handlers share; created by the startup handler and kept in kopf's memo."""

    settings: OperatorSettings
    api: client.ApiClient
    metrics: OperatorMetrics
    poller: ProgressPoller
    wakes: dict[Key, asyncio.Event] = field(default_factory=dict)
    samples: dict[Key, ProgressSample] = field(default_factory=dict)
    polls: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    """The /progress request in flight per job (at most one)."""
    written: dict[Key, Any] = field(default_factory=dict)
    """Per job, the status (without kopf's part) that the API returned for the operator's last status write."""
    gone_pods: dict[Key, dict[str, Any]] = field(default_factory=dict)
    """Per job, the last state of each pod deleted since its last reconcile (by uid), for the usage ledger."""

    def wake(self, key: Key) -> None:
        event = self.wakes.get(key)
        if event is not None:
            event.set()


def state_of(memo: Any) -> OperatorState:
    state = memo.get("state") if isinstance(memo, Mapping) else getattr(memo, "state", None)
    if not isinstance(state, OperatorState):
        raise kopf.TemporaryError("operator state is not initialised yet", delay=1)
    return state


# --- observation: indexes of children by (namespace, DreamBoothJob name) -----------------------------------


def _trim(body: Mapping[str, Any], spec_keys: Iterable[str] = ()) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    trimmed: dict[str, Any] = {
        "metadata": {
            k: copy.deepcopy(meta[k])
            for k in (
                "name",
                "namespace",
                "uid",
                "labels",
                "annotations",
                "ownerReferences",
                "deletionTimestamp",
                "creationTimestamp",
            )
            if k in meta
        },
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }
    spec = body.get("spec") or {}
    trimmed["spec"] = {k: copy.deepcopy(spec[k]) for k in spec_keys if k in spec}
    return trimmed


@kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS)
def batch_jobs_by_owner(*, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
    return {(namespace, labels[LABEL_JOB_NAME]): _trim(body, ("suspend", "completions", "parallelism"))}


@kopf.index("v1", "pods", labels=CHILD_LABELS)
def pods_by_owner(*, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
    return {(namespace, labels[LABEL_JOB_NAME]): _trim(body)}


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
def wake_on_batch_job(*, namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any) -> None:
    state_of(memo).wake((namespace or "", labels[LABEL_JOB_NAME]))


@kopf.on.event("v1", "pods", labels=CHILD_LABELS)
def wake_on_pod(
    *, namespace: str | None, labels: Mapping[str, str], memo: Any, type: str, body: kopf.Body, **_: Any
) -> None:
    state = state_of(memo)
    key = (namespace or "", labels[LABEL_JOB_NAME])
    if type == "DELETED" and key in state.wakes:
        # The index forgets a deleted pod; its last state (often Failed or Succeeded with finishedAt, written just
        # before the deletion) still closes its usage entry at the next reconcile.
        state.gone_pods.setdefault(key, {})[podstate.pod_uid(body)] = _trim(body)
    state.wake(key)


@kopf.index(GROUP, VERSION, INFERENCE_PLURAL)
def services_by_source_job(*, namespace: str | None, name: str | None, spec: kopf.Spec, **_: Any) -> Any:
    """InferenceServices that serve a DreamBoothJob's model (model.fromJob), by (namespace, job name)."""
    job = (spec.get("model") or {}).get("fromJob")
    return {(namespace, job): name} if job else None


@kopf.on.event(GROUP, VERSION, JOB_PLURAL)
def wake_on_job(
    *,
    namespace: str | None,
    name: str | None,
    memo: Any,
    type: str,
    status: kopf.Status,
    **kwargs: Any,
) -> None:
    services: kopf.Index[tuple[str | None, str], str] = kwargs["services_by_source_job"]
    state = state_of(memo)
    key = (namespace or "", name or "")
    if type == "DELETED":
        state.metrics.set_phase(*key, None)
    state.wake(key)
    if type == "DELETED" or status.get("phase") in TERMINAL_JOB_PHASES:
        # A service waiting for this job's model serves it now, not at its next periodic reconcile.
        for service in services.get((namespace, name or ""), []):
            state.wake(inference_key(namespace, service))


# --- the reconcile loop ----------------------------------------------------------------------------------


@kopf.daemon(GROUP, VERSION, JOB_PLURAL, cancellation_timeout=5.0)
async def job_loop(
    *,
    body: kopf.Body,
    namespace: str | None,
    name: str | None,
    stopped: kopf.DaemonStopped,
    memo: Any,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    """Reconcile one DreamBoothJob until it is finished (terminal, TTL done) or deleted."""
    batch_jobs_index: kopf.Index[Key, Any] = kwargs["batch_jobs_by_owner"]
    pods_index: kopf.Index[Key, Any] = kwargs["pods_by_owner"]
    state = state_of(memo)
    key = (namespace or "", name or "")
    wake = state.wakes.setdefault(key, asyncio.Event())
    try:
        while not stopped:
            wake.clear()
            started = time.perf_counter()
            plan: Plan | None = None
            try:
                plan = await reconcile_job(state, body, batch_jobs_index, pods_index, logger)
            except (client.ApiException, aiohttp.ClientError, OSError, kopf.TemporaryError) as err:
                state.metrics.reconcile_errors.inc()
                logger.warning("reconcile failed, retrying: %s", err)
            except Exception:
                state.metrics.reconcile_errors.inc()
                logger.exception("reconcile failed")
            finally:
                state.metrics.reconcile_duration.observe(time.perf_counter() - started)
            if plan is not None and plan.finished:
                logger.info("job finished; its reconcile loop ends")
                return
            timeout = state.settings.reconcile_interval_seconds
            if plan is not None and plan.requeue_after is not None:
                timeout = min(timeout, max(0.2, plan.requeue_after))
            if plan is None:
                timeout = min(timeout, 2.0)
            await _sleep(wake, stopped, timeout)
    finally:
        state.wakes.pop(key, None)
        state.samples.pop(key, None)
        state.written.pop(key, None)
        state.gone_pods.pop(key, None)
        poll = state.polls.pop(key, None)
        if poll is not None:
            poll.cancel()
        state.poller.forget(key)


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> None:
    """Until a wake-up, the daemon's stop (operator exit, object deletion), or the timeout."""

    async def until_stopped() -> None:
        await stopped.wait()

    waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(until_stopped())}
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def reconcile_job(
    state: OperatorState,
    body: kopf.Body,
    batch_jobs: kopf.Index[Key, Any],
    pods: kopf.Index[Key, Any],
    logger: kopf.Logger,
) -> Plan:
    job = copy.deepcopy(dict(body))
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    key = (namespace, name)
    if key in state.written and _own_status(job) != state.written[key]:
        # The watch has not delivered the operator's last status write yet: a plan made from this older copy could
        # count a restart twice or recreate a deleted attempt, so read the object itself.
        fresh = await asyncio.to_thread(kube.get, state.api, f"{GROUP}/{VERSION}", "DreamBoothJob", namespace, name)
        if fresh is None:
            raise kopf.TemporaryError("the DreamBoothJob is gone", delay=1)
        job = dict(fresh)
        state.metrics.stale_reads.inc()
    observed_jobs = [copy.deepcopy(j) for j in batch_jobs.get(key, [])]
    observed_pods = [copy.deepcopy(p) for p in pods.get(key, [])]
    gone = dict(state.gone_pods.get(key, {}))
    sample = await poll_progress(state, key, job, observed_pods, logger)
    prev = parse_status(job)
    plan = reconcile(
        Observed(job, observed_jobs, observed_pods, now_utc(), progress=sample, gone_pods=list(gone.values()))
    )
    await asyncio.to_thread(execute, state, job, owned_batch_jobs(job, observed_jobs), plan)
    if plan.counted_pods is not None:
        annotations = {COUNTED_PODS_ANNOTATION: json.dumps(plan.counted_pods)}
        await asyncio.to_thread(
            kube.merge_patch,
            state.api,
            f"{GROUP}/{VERSION}",
            "DreamBoothJob",
            namespace,
            name,
            {"metadata": {"annotations": annotations}},
        )
    patch = kube.merge_diff(job.get("status"), plan.status_wire(), keep=frozenset({"kopf"}))
    if patch:
        written = await asyncio.to_thread(kube.patch_status, state.api, namespace, name, patch)
        state.written[key] = _own_status(written or {})
    else:
        state.written[key] = _own_status(job)
    for uid in gone:  # in the written status now
        state.gone_pods.get(key, {}).pop(uid, None)
    # Events only after the status write succeeded (a failed write retries the whole reconcile).
    for event in plan.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])
        state.metrics.events.labels(type=event.type, reason=event.reason).inc()
    record_metrics(state.metrics, job, prev.phase, plan)
    return plan


def _own_status(job: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (job.get("status") or {}).items() if k != "kopf"}


async def poll_progress(
    state: OperatorState,
    key: Key,
    job: Mapping[str, Any],
    pods: list[Mapping[str, Any]],
    logger: kopf.Logger,
) -> ProgressSample | None:
    """Start reading rank 0's /progress when it is due, and wait for it at most PROGRESS_WAIT_SECONDS.

    Returns the newest good sample. A slow answer (a busy pod, the shared request limit) never holds up the
    reconcile that handles failures and restarts: when it arrives, it wakes the job's loop again.
    """
    attempt = parse_status(job).attempt
    rank0 = next(
        (
            p
            for p in pods
            if podstate.pod_rank(p) == 0
            and (p["metadata"].get("labels") or {}).get(LABEL_ATTEMPT) == str(attempt)
            and podstate.is_running(p)
            and podstate.pod_ip(p)
        ),
        None,
    )
    poll = state.polls.get(key)
    if poll is None and rank0 is not None and state.poller.due(key):
        poll = asyncio.create_task(_fetch_progress(state, key, attempt, rank0, logger))
        state.polls[key] = poll
    if poll is not None:
        done, _ = await asyncio.wait({poll}, timeout=PROGRESS_WAIT_SECONDS)
        if not done:
            poll.add_done_callback(lambda _: state.wake(key))
    return state.samples.get(key)


async def _fetch_progress(
    state: OperatorState, key: Key, attempt: int, rank0: Mapping[str, Any], logger: kopf.Logger
) -> None:
    try:
        data = await state.poller.fetch(key, str(podstate.pod_ip(rank0)))
    except (aiohttp.ClientError, TimeoutError, ValueError) as err:
        state.metrics.progress_polls.labels(result="error").inc()
        logger.debug("/progress of %s not available: %r", rank0["metadata"]["name"], err)
        return
    finally:
        state.polls.pop(key, None)
    state.metrics.progress_polls.labels(result="ok").inc()
    started = podstate.parse_time((rank0.get("status") or {}).get("startTime"))
    state.samples[key] = ProgressSample(attempt, podstate.pod_uid(rank0), started, data, now_utc())


def execute(state: OperatorState, job: Mapping[str, Any], batch_jobs: list[Mapping[str, Any]], plan: Plan) -> None:
    """Carry out the plan's actions (blocking; runs in a worker thread). `batch_jobs`: those the job owns."""
    api = state.api
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    for action in plan.actions:
        if action.kind is ActionKind.CREATE_ATTEMPT:
            kube.apply(api, build_configmap(job))
            kube.apply(api, build_service(job))
            kube.create(api, build_batch_job(job, action.attempt, state.settings))
        elif action.kind is ActionKind.DELETE_BATCH_JOB:
            # Foreground: the Job stays until its pods have stopped (and written their checkpoint).
            kube.delete(api, "batch/v1", "Job", namespace, action.name, propagation="Foreground")
        elif action.kind is ActionKind.FORCE_DELETE_POD:
            # Its node is lost: no kubelet will confirm the stop, so remove the object without waiting.
            kube.delete(api, "v1", "Pod", namespace, action.name, grace_period_seconds=0, uid=action.uid or None)
        elif action.kind is ActionKind.SET_SUSPEND:
            kube.merge_patch(api, "batch/v1", "Job", namespace, action.name, {"spec": {"suspend": action.suspend}})
        elif action.kind is ActionKind.DELETE_CHILDREN:
            for batch_job in batch_jobs:
                kube.delete(api, "batch/v1", "Job", namespace, batch_job["metadata"]["name"])
            kube.delete(api, "v1", "Service", namespace, names.service_name(name))
            kube.delete(api, "v1", "ConfigMap", namespace, names.configmap_name(name))


def record_metrics(metrics: OperatorMetrics, job: Mapping[str, Any], prev_phase: JobPhase | None, plan: Plan) -> None:
    meta = job["metadata"]
    status = plan.status
    phase = status.phase
    metrics.set_phase(meta["namespace"], meta["name"], phase.value if phase else None)
    prev = parse_status(job)
    if status.restarts.preemptions > prev.restarts.preemptions:
        metrics.restarts.labels(reason="preemption").inc(status.restarts.preemptions - prev.restarts.preemptions)
    if status.restarts.failures > prev.restarts.failures:
        metrics.restarts.labels(reason="failure").inc(status.restarts.failures - prev.restarts.failures)
    redone = (status.progress.steps_redone if status.progress else 0) - (
        prev.progress.steps_redone if prev.progress else 0
    )
    if redone > 0:
        metrics.steps_redone.inc(redone)
    if phase == prev_phase:
        return
    if phase in (JobPhase.SUCCEEDED, JobPhase.FAILED):
        metrics.job_gpu_seconds.labels(phase=phase.value).observe(status.usage.gpu_seconds if status.usage else 0)
    created = podstate.parse_time(meta.get("creationTimestamp"))
    if created is None:
        return
    elapsed = max(0.0, (now_utc() - created).total_seconds())
    if phase == JobPhase.RUNNING and status.attempt == 0 and status.restarts.total == 0:
        metrics.time_to_running.observe(elapsed)
    if phase in (JobPhase.SUCCEEDED, JobPhase.FAILED) and math.isfinite(elapsed):
        metrics.job_duration.labels(phase=phase.value).observe(elapsed)


# --- InferenceService: one loop per service (lower volume; reads its source job and Deployment directly) ---

INFERENCE_PREFIX = "inferenceservice/"
SERVING_LABELS = {LABEL_INFERENCE_NAME: kopf.PRESENT}


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


def inference_key(namespace: str | None, name: str | None) -> Key:
    """The wake-up key of an InferenceService's loop (apart from the DreamBoothJobs' keys)."""
    return (namespace or "", INFERENCE_PREFIX + (name or ""))


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
    wake = state.wakes.setdefault(key, asyncio.Event())
    try:
        while not stopped:
            wake.clear()
            try:
                events = await asyncio.to_thread(reconcile_inference_once, state, body)
                # Events only after the status write (inside reconcile_inference_once) succeeded.
                for type_, reason, message in events:
                    kopf.event(body, type=type_, reason=reason, message=message[:1024])
            except (client.ApiException, OSError) as err:
                state.metrics.reconcile_errors.inc()
                logger.warning("InferenceService reconcile failed, retrying: %s", err)
            except Exception:
                state.metrics.reconcile_errors.inc()
                logger.exception("InferenceService reconcile failed")
            await _sleep(wake, stopped, state.settings.reconcile_interval_seconds)
    finally:
        state.wakes.pop(key, None)


def reconcile_inference_once(state: OperatorState, body: kopf.Body) -> list[tuple[str, str, str]]:
    isvc = copy.deepcopy(dict(body))
    meta = isvc["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    source_name = ((isvc.get("spec") or {}).get("model") or {}).get("fromJob")
    source = kube.get(state.api, f"{GROUP}/{VERSION}", "DreamBoothJob", namespace, source_name) if source_name else None
    deployment = kube.get(state.api, "apps/v1", "Deployment", namespace, name)
    selector = f"{LABEL_INFERENCE_NAME}={name}"  # the serving pods, for a failed model load's termination message
    pods = kube.request(state.api, "GET", kube.path_of("v1", "Pod", namespace), query=[("labelSelector", selector)])
    plan = reconcile_inference(isvc, source, deployment, state.settings, now_utc(), pods.get("items") or [])
    # Stale children first: a leftover HPA must not rescale the Deployment after the fixed count is applied.
    for api_version, kind, child_name in plan.stale:  # e.g. the HPA once autoscaling is off; a 404 is fine
        kube.delete(state.api, api_version, kind, namespace, child_name)
    if plan.handover is not None:
        # The live spec.replicas, applied by a second manager that then co-owns the field. Not forced: should the
        # HPA have changed the count since the Deployment was read, this conflicts (409) and the reconcile fails
        # before the operator's own apply; the next one sees that the HPA owns the field.
        kube.apply(state.api, plan.handover, manager=HANDOVER_FIELD_MANAGER, force=False)
    for child in plan.children:
        kube.apply(state.api, child)
    patch = kube.merge_diff(isvc.get("status"), plan.status.to_wire(), keep=frozenset({"kopf"}))
    if patch:
        kube.patch_status(state.api, namespace, name, patch, kind="InferenceService")
    return plan.events

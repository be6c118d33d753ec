"""DreamBoothJob handlers: observe (indexes), reconcile (pure), write status once, emit events, then act (kube.py).

One kopf daemon per DreamBoothJob runs its reconcile loop (loop.py). The loop wakes when the job or one of its
batch Jobs or pods changes (the event handlers below poke it), and at least every `reconcile_interval_seconds`
(to poll rank 0's /progress and to honour deadlines and TTLs) while the job may change by itself; a job with nothing
to do and no pod on a node backs off, doubling up to `idle_reconcile_max_seconds` (loop.py `idle_interval`). The
batch Jobs and pods are observed through kopf indexes (in-memory, kept current by watches), so a reconcile lists
nothing. The ConfigMap, Service and NetworkPolicy that every attempt shares are not watched: when the plan creates
a batch Job, they are created first, and the creates are their observation (a create fails on an existing object,
which only then is read); the plan is made again knowing whether anything else holds their names
(policies/ownership.py). So a new job costs one request per child (a create-only server-side apply), and no read.

The status is written before the other actions run: a restart counted in this reconcile (a gang restart deletes
the failed attempt's batch Job) must not be lost should the operator die between the two, since the deleted Job
would take the evidence with it. Every action is derived again from what is observed, so a crash after the status
write only delays them to the next reconcile. (The shared children, made before the status write, are no
evidence of anything: they are the job's own and the same at every attempt.)
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import aiohttp
import kopf
from kubernetes import client

from dreambooth_api.common import find_condition
from dreambooth_api.constants import (
    ANNOTATION_COUNTED_PREEMPTIONS,
    GROUP,
    JOB_KIND,
    JOB_PLURAL,
    LABEL_ATTEMPT,
    LABEL_JOB_NAME,
    TERMINAL_JOB_PHASES,
    VERSION,
    JobConditionType,
    JobPhase,
    Reason,
)
from dreambooth_operator import kube, podstate
from dreambooth_operator.builders import build_batch_job, build_configmap, build_service
from dreambooth_operator.evaluate_builders import build_evaluation_job
from dreambooth_operator.handlers.loop import LoopKind, Pass, pods_wait, report_field_conflict, run_loop
from dreambooth_operator.handlers.state import Key, OperatorState, inference_key, state_of, trim
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.networkpolicies import build_job_network_policy
from dreambooth_operator.observed import Observed, ProgressSample, now_utc, owned_batch_jobs, parse_status
from dreambooth_operator.ownership import ObservedChildren
from dreambooth_operator.plan import ActionKind, Plan
from dreambooth_operator.policies import evaluate_rerun
from dreambooth_operator.preflight_builders import build_preflight_job
from dreambooth_operator.reconcile import reconcile
from dreambooth_operator.settings import OperatorSettings

CHILD_LABELS = {LABEL_JOB_NAME: kopf.PRESENT}
API_VERSION = f"{GROUP}/{VERSION}"
# How long a reconcile waits for a /progress answer before going on with the last sample.
PROGRESS_WAIT_SECONDS = 0.5
JOB_LOOP = LoopKind(
    name="reconcile",
    retryable=(
        client.ApiException,
        aiohttp.ClientError,
        OSError,
        kopf.TemporaryError,
        kube.ForeignChildError,
        kube.FieldConflictError,
    ),
    retry_after_error=2.0,
    timed=True,
)


# --- observation: indexes of children by (namespace, DreamBoothJob name) -----------------------------------


@kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS)
def batch_jobs_by_owner(*, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
    return {(namespace, labels[LABEL_JOB_NAME]): trim(body, ("suspend", "completions", "parallelism"))}


@kopf.index("v1", "pods", labels=CHILD_LABELS)
def pods_by_owner(*, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
    return {(namespace, labels[LABEL_JOB_NAME]): trim(body)}


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
        state.gone_pods.setdefault(key, {})[podstate.pod_uid(body)] = trim(body)
    state.wake(key)


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
        state.loop_locks.pop(key, None)
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

    async def once() -> Pass:
        key = (namespace or "", name or "")
        try:
            plan = await reconcile_job(state, body, batch_jobs_index, pods_index, logger)
        except kube.FieldConflictError as err:
            report_field_conflict(state, key, body, err)
            raise
        state.conflicts.pop(key, None)
        # Idle (the periodic check backs off): nothing to do, and no pod that could change without an event; not
        # while the batch Job it just created is awaited (that pass planned nothing: state.awaiting).
        idle = not plan.actions and pods_wait(pods_index.get(key, [])) and key not in state.expected
        return Pass(finished=plan.finished, requeue_after=plan.requeue_after, idle=idle)

    async with state.loop_lock((namespace or "", name or "")):
        await run_loop(state, (namespace or "", name or ""), JOB_LOOP, once, stopped, logger)


@kopf.daemon(
    GROUP,
    VERSION,
    JOB_PLURAL,
    id="evaluation_request",
    cancellation_timeout=5.0,
    when=lambda body, **_: evaluate_rerun.pending(body),
)
async def evaluation_request_loop(
    *,
    body: kopf.Body,
    namespace: str | None,
    name: str | None,
    stopped: kopf.DaemonStopped,
    memo: Any,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    """Serve an evaluation request (annotation dreambooth.dev/evaluate) of a job whose own loop has ended (a finished
    job). While the job's own loop runs, it serves the request itself and this one waits for the loop lock. kopf
    runs this only while a request is pending and stops it once status.observedEvaluateRequest records it (a daemon
    stopped by its filter is started again for the next request; one that returns by itself never is)."""
    batch_jobs_index: kopf.Index[Key, Any] = kwargs["batch_jobs_by_owner"]
    pods_index: kopf.Index[Key, Any] = kwargs["pods_by_owner"]
    state = state_of(memo)
    key = (namespace or "", name or "")

    async def once() -> Pass:
        plan = await reconcile_job(state, body, batch_jobs_index, pods_index, logger)
        idle = not plan.actions and pods_wait(pods_index.get(key, []))
        return Pass(finished=False, requeue_after=plan.requeue_after, idle=idle or plan.finished)

    async with state.loop_lock(key):
        await run_loop(state, key, JOB_LOOP, once, stopped, logger)


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
    waiting = state.awaiting(key, batch_jobs.get(key, []))
    if waiting is not None:
        # The index has not shown the batch Job this loop just created: nothing to plan from yet (its event wakes
        # the loop).
        return Plan(status=parse_status(job), requeue_after=waiting)
    if key in state.written and _own_writes(job) != state.written[key]:
        # The watch has not delivered the operator's last writes yet (status and counted-preemptions annotation):
        # a plan made from this older copy, or from the version between the two writes, could count a restart
        # twice or recreate a deleted attempt, so read the object itself.
        fresh = await asyncio.to_thread(kube.get, state.api, API_VERSION, JOB_KIND, namespace, name)
        if fresh is None:
            raise kopf.TemporaryError("the DreamBoothJob is gone", delay=1)
        job = dict(fresh)
        state.metrics.stale_reads.inc()
    observed_jobs = [copy.deepcopy(j) for j in batch_jobs.get(key, [])]
    observed_pods = [copy.deepcopy(p) for p in pods.get(key, [])]
    gone = dict(state.gone_pods.get(key, {}))
    sample = await poll_progress(state, key, job, observed_pods, logger)
    prev = parse_status(job)
    obs = Observed(
        job,
        observed_jobs,
        observed_pods,
        now_utc(),
        progress=sample,
        gone_pods=list(gone.values()),
        rules=state.settings.rules_for(namespace),
    )
    plan = reconcile(obs)
    creates = (ActionKind.CREATE_ATTEMPT, ActionKind.CREATE_PREFLIGHT, ActionKind.CREATE_EVALUATION)
    if any(a.kind in creates for a in plan.actions):
        # About to create a batch Job: create (or update) the children that every attempt shares, and plan again
        # knowing whether anything else holds their names (policies/ownership.py).
        children = await asyncio.to_thread(ensure_shared_children, state, job)
        plan = reconcile(replace(obs, children=children))
    # Status first (see the module's docstring), then the counted-preemptions annotation, then the events.
    patch = kube.merge_diff(job.get("status"), plan.status_wire(), keep=frozenset({"kopf"}))
    written = _own_writes(job)
    if patch:
        answer = await asyncio.to_thread(kube.patch_status, state.api, namespace, name, patch)
        written = {**written, "status": _own_writes(answer or {})["status"]}
    state.written[key] = written
    if plan.counted_pods is not None:
        annotations = {ANNOTATION_COUNTED_PREEMPTIONS: json.dumps(plan.counted_pods)}
        answer = await asyncio.to_thread(
            kube.merge_patch,
            state.api,
            API_VERSION,
            JOB_KIND,
            namespace,
            name,
            {"metadata": {"annotations": annotations}},
        )
        state.written[key] = {**written, "counted": _own_writes(answer or {})["counted"]}
    for uid in gone:  # in the written status now
        state.gone_pods.get(key, {}).pop(uid, None)
    # Events only after the status write succeeded (a failed write retries the whole reconcile).
    for event in plan.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])
        state.metrics.events.labels(type=event.type, reason=event.reason).inc()
    record_metrics(state.metrics, job, prev.phase, plan)
    created = await asyncio.to_thread(execute, state, job, owned_batch_jobs(job, observed_jobs), plan)
    state.expect(key, created)
    return plan


def _own_writes(job: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator writes into the DreamBoothJob: its status (without kopf's part) and the
    counted-preemptions annotation."""
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    return {
        "status": {k: v for k, v in (job.get("status") or {}).items() if k != "kopf"},
        "counted": annotations.get(ANNOTATION_COUNTED_PREEMPTIONS),
    }


def singletons(job: Mapping[str, Any], settings: OperatorSettings) -> list[dict[str, Any]]:
    """The children that every attempt shares, in the order they are made (the NetworkPolicy before any pod)."""
    children = [build_configmap(job), build_service(job)]
    if settings.network_policies:
        children.append(build_job_network_policy(job, settings))
    return children


def ensure_shared_children(state: OperatorState, job: Mapping[str, Any]) -> ObservedChildren:
    """Create the children that every attempt shares (or update them, the job's own), in order, and return them as
    the API server has them, by (kind, name). Once one turns out to be another object's, the rest are only read,
    never created, so that the conflict names all of them and nothing more is made for a blocked job."""
    found: dict[tuple[str, str], Any] = {}
    blocked = False
    for child in singletons(job, state.settings):
        version, kind, meta = child["apiVersion"], child["kind"], child["metadata"]
        key = (kind, meta["name"])
        if blocked:
            found[key] = kube.get(state.api, version, kind, meta["namespace"], meta["name"])
            continue
        try:
            found[key] = kube.ensure_child(state.api, child, job)  # never touches another object of the name
        except kube.ForeignChildError as err:
            found[key], blocked = err.found, True
    return found


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
    """One /progress read; a body that is too large, not JSON, or without a usable step counts as a failed poll."""
    try:
        document = await state.poller.fetch(key, str(podstate.pod_ip(rank0)))
    except (aiohttp.ClientError, TimeoutError, ValueError) as err:  # ValueError: ProgressError among others
        state.metrics.progress_polls.labels(result="error").inc()
        logger.debug("/progress of %s not available: %r", rank0["metadata"]["name"], err)
        return
    finally:
        state.polls.pop(key, None)
    state.metrics.progress_polls.labels(result="ok").inc()
    started = podstate.parse_time((rank0.get("status") or {}).get("startTime"))
    state.samples[key] = ProgressSample(attempt, podstate.pod_uid(rank0), started, document, now_utc())


def execute(state: OperatorState, job: Mapping[str, Any], batch_jobs: list[Mapping[str, Any]], plan: Plan) -> list[str]:
    """Carry out the plan's actions (blocking; runs in a worker thread). `batch_jobs`: those the job owns. Returns
    the names of the batch Jobs it created."""
    api = state.api
    meta = job["metadata"]
    namespace, uid = meta["namespace"], str(meta.get("uid") or "")
    # Only the job's own batch Jobs are ever changed or deleted, each with its uid as precondition.
    owned = {str(j["metadata"]["name"]): str(j["metadata"].get("uid") or "") for j in batch_jobs}
    created: list[str] = []
    for action in plan.actions:
        # The shared children exist: reconcile_job made them before it planned these (ensure_shared_children).
        if action.kind in (ActionKind.CREATE_ATTEMPT, ActionKind.CREATE_PREFLIGHT, ActionKind.CREATE_EVALUATION):
            manifest = (
                build_batch_job(job, action.attempt, state.settings)
                if action.kind is ActionKind.CREATE_ATTEMPT
                else one_pod_job(job, action.kind, state.settings)
            )
            if kube.create(api, manifest):
                created.append(manifest["metadata"]["name"])
        elif action.kind is ActionKind.DELETE_BATCH_JOB and action.name in owned:
            # Foreground: the Job stays until its pods have stopped (and written their checkpoint).
            kube.delete(
                api, "batch/v1", "Job", namespace, action.name, propagation="Foreground", uid=owned[action.name]
            )
        elif action.kind is ActionKind.FORCE_DELETE_POD:
            # Its node is lost: no kubelet will confirm the stop, so remove the object without waiting.
            kube.delete(api, "v1", "Pod", namespace, action.name, grace_period_seconds=0, uid=action.uid or None)
        elif action.kind is ActionKind.SET_SUSPEND and action.name in owned:
            # metadata.uid in a merge patch is a precondition too (422 for another object of the name).
            patch = {"metadata": {"uid": owned[action.name]}, "spec": {"suspend": action.suspend}}
            kube.merge_patch(api, "batch/v1", "Job", namespace, action.name, patch)
        elif action.kind is ActionKind.DELETE_CHILDREN:
            for batch_name, batch_uid in owned.items():
                kube.delete(api, "batch/v1", "Job", namespace, batch_name, uid=batch_uid)
            for child in singletons(job, state.settings):
                child_meta = child["metadata"]
                kube.delete_owned(api, child["apiVersion"], child["kind"], namespace, child_meta["name"], uid)
    return created


def one_pod_job(job: Mapping[str, Any], kind: ActionKind, settings: OperatorSettings) -> dict[str, Any]:
    """The input check's or the re-evaluation's batch Job (one pod, no attempt's)."""
    if kind is ActionKind.CREATE_EVALUATION:
        return build_evaluation_job(job, evaluate_rerun.requested(job) or "", settings)
    return build_preflight_job(job, settings)


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
    reevaluated = find_condition(status.conditions, JobConditionType.REEVALUATED.value)
    newly_served = status.observed_evaluate_request not in (None, prev.observed_evaluate_request)
    if newly_served and reevaluated is not None and reevaluated.reason == Reason.REEVALUATED and status.outputs:
        metrics.observe_evaluation(status.outputs.evaluation)  # the scores of a request served now
    if phase == prev_phase:
        return
    if phase in (JobPhase.SUCCEEDED, JobPhase.FAILED):
        metrics.job_gpu_seconds.labels(phase=phase.value).observe(status.usage.gpu_seconds if status.usage else 0)
    if phase == JobPhase.SUCCEEDED and status.outputs is not None:
        metrics.observe_evaluation(status.outputs.evaluation)
    created = podstate.parse_time(meta.get("creationTimestamp"))
    if created is None:
        return
    elapsed = max(0.0, (now_utc() - created).total_seconds())
    if phase == JobPhase.RUNNING and status.attempt == 0 and status.restarts.total == 0:
        metrics.time_to_running.observe(elapsed)
    if phase in (JobPhase.SUCCEEDED, JobPhase.FAILED) and math.isfinite(elapsed):
        metrics.job_duration.labels(phase=phase.value).observe(elapsed)

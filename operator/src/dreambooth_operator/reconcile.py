"""The pure state machine of a DreamBoothJob (one reconcile, in the shape of JobSet's controller).

observe (observed.py: the job, its batch Jobs and pods, rank 0's progress) -> classify (by attempt) -> apply the
policies (policies/, one file each: validity, restrictions, budget, preemption, failure, progress, deadline,
success, gang, suspend, pod_spec_change, lost_pods, ownership, ttl; preflight, the CPU-only input check before the
first attempt; evaluate_rerun, a finished job's evaluation again on request) -> create what is missing -> the new
status, once (plan.py). The handler writes the status, emits the events, and then carries out the actions.

Status never goes backwards: terminal phases are sticky, the attempt and restart counters only grow, a stale
object (an older generation than the status has seen) changes nothing, and a condition keeps its transition
time while its status stays the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dreambooth_api.common import find_condition
from dreambooth_api.constants import TERMINAL_JOB_PHASES, JobConditionType, JobPhase, Reason
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_api.progress import RESUMED_PHASES, TrainerPhase
from dreambooth_operator import podstate
from dreambooth_operator.observed import Attempt, Observed, classify, parse_status, split_owned
from dreambooth_operator.plan import Action, ActionKind, Plan, PlanBuilder
from dreambooth_operator.policies import (
    budget,
    deadline,
    evaluate_rerun,
    failure,
    gang,
    lost_pods,
    ownership,
    pod_spec_change,
    preemption,
    preflight,
    progress,
    restrictions,
    success,
    suspend,
    ttl,
    validity,
)


def reconcile(obs: Observed) -> Plan:  # noqa: PLR0911 - one early return per policy, read top to bottom
    """Compute the next status and the actions for one DreamBoothJob."""
    meta = obs.job.get("metadata") or {}
    generation = meta.get("generation")
    prev = parse_status(obs.job)
    # A stale body (older than what the status already reflects) must not change anything.
    if prev.observed_generation is not None and generation is not None and generation < prev.observed_generation:
        return Plan(status=prev, requeue_after=None)
    obs, foreign = split_owned(obs)
    obs, checks = preflight.split(obs, foreign)  # the input check's pods hold no GPU and are no attempt's
    b = PlanBuilder(obs, prev, generation)

    budget.account_usage(b)
    if prev.phase in TERMINAL_JOB_PHASES:
        return evaluate_rerun.serve(b, foreign) or ttl.finish(b)
    evaluate_rerun.refuse_unfinished(b)
    spec = validity.valid_spec(b)
    if spec is None or not restrictions.allowed(b, spec):
        return ttl.finish(b)

    attempt = classify(obs, b.job_name, prev.attempt, foreign)
    b.actions.extend(Action(ActionKind.DELETE_BATCH_JOB, name=j["metadata"]["name"]) for j in attempt.older_batch_jobs)
    preemption.count(b, spec, attempt)
    failure.count_job_failures(b, spec, attempt)
    progress.take_sample(b, attempt)

    if deadline.passed(b, spec, attempt):
        return ttl.finish(b)
    if success.apply(b, spec, attempt) or failure.invalid_input(b, spec, attempt):
        return ttl.finish(b)
    restarted = gang.restart(b, spec, attempt)
    if restarted is not None:
        return restarted
    if failure.batch_job_failed(b, spec, attempt) or budget.spent(b, spec, attempt):
        return ttl.finish(b)

    if attempt.batch_job is None:
        if attempt.blocker is not None:
            return ownership.blocked_by_batch_job(b, attempt.blocker)
        checking = preflight.check_input(b, spec, attempt, checks)
        if checking is not None:
            return checking
        return _start_attempt(b, spec, attempt)
    held = suspend.hold(b, spec, attempt)
    if held is not None:
        return held
    return _running(b, spec, attempt, attempt.batch_job)


# --- create what is missing ------------------------------------------------------------------------------


def _start_attempt(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt) -> Plan:
    """Create the attempt's children once the previous attempt's pods have stopped."""
    note = lost_pods.clear_previous_attempt(b, attempt)
    if note is None or ownership.blocked(b):
        return b.plan()
    b.actions.append(Action(ActionKind.CREATE_ATTEMPT, attempt=attempt.number))
    if not suspend.hold_new_attempt(b, spec):
        b.phase(JobPhase.PENDING, f"creating attempt {attempt.number}" + (f" ({note})" if note else ""))
    return b.plan()


# --- the status of an attempt that runs ------------------------------------------------------------------


def _running(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt, current: Mapping[str, Any]) -> Plan:
    """The phase from the attempt's pods (`current`: its batch Job): Pending (pulling, unschedulable, not all up),
    Initializing or Running."""
    pods = attempt.pods
    active = [p for p in pods if podstate.is_active(p) and not podstate.is_deleting(p)]
    pull = next((m for p in active if (m := podstate.image_pull_failure(p))), None)
    unsched = next((m for p in active if (m := podstate.unschedulable(p))), None)
    nodes = spec.resources.nodes
    running, done = _running_and_done(current, pods)
    replaced = pod_spec_change.replace_stuck_attempt(b, spec, attempt, pull or unsched)
    if replaced is not None:
        return replaced
    if pull is not None:
        b.phase(JobPhase.PENDING, f"the trainer image cannot be pulled: {pull}")
        b.condition(JobConditionType.RUNNING, False, Reason.IMAGE_PULL_FAILED, pull)
    elif unsched is not None:
        b.phase(JobPhase.PENDING, f"pods cannot be scheduled: {unsched}")
        b.condition(JobConditionType.RUNNING, False, Reason.UNSCHEDULABLE, unsched)
    elif running + done < nodes and not _ranks_unseen(b.prev.phase, current, pods, nodes):
        b.phase(JobPhase.PENDING, f"{running}/{nodes} pods running")
        if find_condition(b.status.conditions, JobConditionType.RUNNING.value) is None:
            b.condition(JobConditionType.RUNNING, False, Reason.PODS_PENDING, f"{running}/{nodes} pods running")
    else:
        restarted = b.status.attempt > 0 or b.status.restarts.total > 0 or b.status.restarts.preemptions > 0
        restarted = restarted or b.status.restarts.failures > 0
        sample = b.status.progress
        training = sample is not None and (
            (sample.stage or "") in RESUMED_PHASES or (sample.step > 0 and sample.stage != TrainerPhase.INITIALIZING)
        )
        phase = JobPhase.RUNNING if training else JobPhase.INITIALIZING
        evaluating = sample is not None and sample.stage == TrainerPhase.EVALUATING
        doing = "evaluating the trained model" if evaluating else "training"
        b.phase(phase, doing if training else "loading the model and data")
        reason = Reason.RESUMED if restarted else (Reason.TRAINING if training else Reason.PODS_RUNNING)
        b.condition(JobConditionType.RUNNING, True, reason, f"{nodes} pod(s) running (attempt {b.status.attempt})")
    lost_pods.force_delete_lost(b, pods)
    return b.plan()


def _all_up(pods: list[Mapping[str, Any]]) -> bool:
    """No observed pod is a new cause to leave Running: each one runs or exited 0."""
    return all(podstate.is_running(p) or podstate.pod_phase(p) == "Succeeded" for p in pods)


def _running_and_done(current: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> tuple[int, int]:
    """Ranks running and ranks that exited 0. While no pod says otherwise, the Job controller's counters
    (`ready`, `succeeded`) count too: a finished pod may be gone (podgc) or not seen yet. Finished ranks count
    as running until the Job is Complete, so the phase does not drop back to Pending in between."""
    running = sum(1 for p in pods if podstate.is_running(p))
    done = sum(1 for p in pods if podstate.pod_phase(p) == "Succeeded")
    if not _all_up(pods):
        return running, done
    return max(running, podstate.job_count(current, "ready")), max(done, podstate.job_count(current, "succeeded"))


def _ranks_unseen(
    prev_phase: JobPhase | None, current: Mapping[str, Any], pods: list[Mapping[str, Any]], nodes: int
) -> bool:
    """A running job whose missing ranks are only not seen (yet): no pod says otherwise, and the Job controller
    counts every rank as active or succeeded. No new cause, so the phase stays."""
    if prev_phase not in (JobPhase.RUNNING, JobPhase.INITIALIZING) or not _all_up(pods):
        return False
    return podstate.job_count(current, "active") + podstate.job_count(current, "succeeded") >= nodes

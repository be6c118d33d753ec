"""Pre-flight policy: before the first GPU attempt, the job's input is checked on a CPU-only pod (the batch Job
`<job>-check`: preflight_builders.py runs trainer/preflight.py), so that bad input costs no GPU-second.

- Run once, for a job's first attempt only: not when spec.runPolicy.preflight is false, not for a job that resumes
  (a later attempt, a checkpoint, a restart), not for one created suspended, and never again once the condition
  InputChecked says it passed or was inconclusive.
- While it runs the job is Pending (condition InputChecked False, reason CheckingInput; ImagePullFailed or
  Unschedulable when its pod cannot start). Its pods hold no GPU: they are no attempt's and not in status.usage.
- Its exit code decides (the trainer's contract, exitcodes.py): 0 passed (InputChecked True, InputValid; the attempt
  is created in the same reconcile); 10 invalid input (the job fails with reason InvalidInput and the check's
  message, status.usage at 0 GPU-seconds); anything else is retried by the Job controller with its backoff, and
  once those tries or the Job's deadline are used up the check is inconclusive (InputCheckInconclusive): the GPU
  Job starts and the trainer checks the input itself. A flaky store or a broken check never fails a job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from enum import StrEnum
from typing import Any, Final

from dreambooth_api.common import find_condition
from dreambooth_api.constants import LABEL_COMPONENT, Component, ConditionStatus, JobConditionType, JobPhase, Reason
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator import names, podstate, usage
from dreambooth_operator.observed import Attempt, Observed
from dreambooth_operator.plan import Action, ActionKind, Plan, PlanBuilder
from dreambooth_operator.policies import failure, ownership, pod_spec_change, ttl

DONE_REASONS: Final = frozenset({Reason.INPUT_VALID, Reason.INVALID_INPUT, Reason.INPUT_CHECK_INCONCLUSIVE})
"""InputChecked reasons after which the check never runs again."""
UNREAD_RESULT_SECONDS: Final = 30.0
"""How long a check Job failed by its podFailurePolicy (invalid input) waits for its pod to be observed, to quote
the pod's message; after that the job fails with the Job's own message."""
RECHECK_SECONDS: Final = 2.0


@dataclass(frozen=True)
class Checks:
    """The pre-flight children of one DreamBoothJob."""

    batch_job: Mapping[str, Any] | None
    """The job's own `<job>-check` batch Job, when it exists."""
    pods: list[Mapping[str, Any]]
    blocker: Mapping[str, Any] | None = None
    """A batch Job named `<job>-check` that another object controls (an earlier job of this name)."""


def is_preflight(obj: Mapping[str, Any]) -> bool:
    return (obj.get("metadata", {}).get("labels") or {}).get(LABEL_COMPONENT) == Component.PREFLIGHT.value


def split(obs: Observed, foreign: list[Mapping[str, Any]]) -> tuple[Observed, Checks]:
    """Take the check's pods out of the observation (they hold no GPU and belong to no attempt: neither usage nor
    the attempt policies see them). Its batch Job stays among the job's batch Jobs, which the restrictions and
    TTL policies delete."""
    name = names.preflight_job_name(str((obs.job.get("metadata") or {}).get("name")))
    checks = Checks(
        batch_job=next((j for j in obs.batch_jobs if j["metadata"]["name"] == name and is_preflight(j)), None),
        pods=[p for p in obs.pods if is_preflight(p)],
        blocker=next((j for j in foreign if j["metadata"]["name"] == name), None),
    )
    rest = replace(
        obs,
        pods=[p for p in obs.pods if not is_preflight(p)],
        gone_pods=[p for p in obs.gone_pods if not is_preflight(p)],
    )
    return rest, checks


def wanted(spec: DreamBoothJobSpec, attempt: Attempt, b: PlanBuilder) -> bool:
    """The check runs (or goes on) before this attempt is created."""
    status = b.status
    resumed = attempt.number > 0 or status.last_checkpoint is not None or status.restarts.total > 0
    if not spec.run_policy.preflight or resumed or spec.run_policy.suspend:
        return False
    cond = find_condition(status.conditions, JobConditionType.INPUT_CHECKED.value)
    return cond is None or (cond.status != ConditionStatus.TRUE and cond.reason not in DONE_REASONS)


class Outcome(StrEnum):
    RUNNING = "Running"
    PASSED = "Passed"
    INVALID = "Invalid"
    INCONCLUSIVE = "Inconclusive"


def outcome(batch_job: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> tuple[Outcome, str]:
    """What the check's batch Job and pods say, and the message to show."""
    invalid = next((p for p in pods if failure.classify(p) is failure.FailureKind.INVALID_INPUT), None)
    if invalid is not None:
        return Outcome.INVALID, str(podstate.termination_message(invalid).get("message") or "invalid input")
    finished = podstate.job_finished(batch_job)
    if finished is None:
        return Outcome.RUNNING, ""
    kind, cond = finished
    if kind == "Complete":
        done = next((p for p in pods if podstate.exit_code(p) == 0), None)
        text = podstate.termination_message(done).get("message") if done is not None else None
        return Outcome.PASSED, str(text or "the input was checked")
    if cond.get("reason") == "PodFailurePolicy":  # exit 10: its pod is not observed (yet)
        return Outcome.INVALID, str(cond.get("message") or "the input check found invalid input")
    last = sorted(pods, key=lambda p: str(p.get("metadata", {}).get("creationTimestamp") or ""))
    detail = podstate.termination_message(last[-1]).get("message") if last else None
    why = f"{cond.get('reason') or 'Failed'}: {cond.get('message') or 'the check Job failed'}"
    return Outcome.INCONCLUSIVE, f"{why}" + (f" (last try: {detail})" if detail else "")


def _checking(b: PlanBuilder, reason: str, message: str) -> Plan:
    b.phase(JobPhase.PENDING, message)
    b.condition(JobConditionType.INPUT_CHECKED, False, reason, message)
    return b.plan()


def check_input(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt, checks: Checks) -> Plan | None:
    """Before the attempt is created: the plan while the check is needed and not done (or once it failed the
    job); None to go on and create the attempt."""
    if not wanted(spec, attempt, b):
        return None
    if checks.blocker is not None:
        return ownership.blocked_by_batch_job(b, checks.blocker)
    name = names.preflight_job_name(b.job_name)
    current = checks.batch_job
    if current is None:
        if ownership.blocked(b):
            return b.plan()
        b.actions.append(Action(ActionKind.CREATE_PREFLIGHT, name=name))
        return _checking(b, Reason.CHECKING_INPUT, f"checking the input on a CPU-only pod (Job {name})")
    if podstate.is_deleting(current):
        b.requeue.append(RECHECK_SECONDS)
        return _checking(b, Reason.CHECKING_INPUT, f"waiting for the deleted input check Job {name} to go")
    return _replace_stuck(b, spec, name, current, checks.pods) or _apply(b, name, current, checks.pods)


def _replace_stuck(
    b: PlanBuilder, spec: DreamBoothJobSpec, name: str, current: Mapping[str, Any], pods: list[Mapping[str, Any]]
) -> Plan | None:
    """The check's pod cannot start (image pull, scheduling) and the user has since changed spec.podTemplate or
    spec.storage: delete the check, and a new one is built from the new spec (as pod_spec_change does for an
    attempt); None otherwise."""
    active = [p for p in pods if podstate.is_active(p) and not podstate.is_deleting(p)]
    stuck = next((m for p in active if (m := podstate.image_pull_failure(p) or podstate.unschedulable(p))), None)
    if stuck is None or not pod_spec_change.changed(current, spec):
        return None
    b.actions.append(Action(ActionKind.DELETE_BATCH_JOB, name=name))
    b.requeue.append(RECHECK_SECONDS)
    message = f"spec.podTemplate or spec.storage changed while the input check could not start ({stuck})"
    b.condition(JobConditionType.RUNNING, False, Reason.POD_SPEC_CHANGED, message)
    return _checking(b, Reason.CHECKING_INPUT, f"{message}; checking again with the new settings")


def _apply(b: PlanBuilder, name: str, current: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> Plan | None:
    """The check Job's outcome: the plan while it runs or once it failed the job, None once it passed or was
    inconclusive (the attempt is created)."""
    result, message = outcome(current, pods)
    if result is Outcome.RUNNING:
        return _running(b, name, pods)
    if result is Outcome.INVALID:
        return _invalid(b, name, current, pods, message)
    if result is Outcome.PASSED:
        b.condition(JobConditionType.INPUT_CHECKED, True, Reason.INPUT_VALID, message)
        return None
    b.condition(
        JobConditionType.INPUT_CHECKED,
        False,
        Reason.INPUT_CHECK_INCONCLUSIVE,
        f"the input check did not finish ({message}); the GPU Job starts and the trainer checks the input itself",
    )
    return None


def _invalid(
    b: PlanBuilder, name: str, current: Mapping[str, Any], pods: list[Mapping[str, Any]], message: str
) -> Plan:
    """Invalid input: the job fails with the check's message and 0 GPU-seconds. When the Job failed by its
    podFailurePolicy before its pod is observed, wait a little for the pod's own message."""
    seen = any(failure.classify(p) is failure.FailureKind.INVALID_INPUT for p in pods)
    failed = podstate.condition(current, "Failed") or {}
    since = podstate.parse_time(failed.get("lastTransitionTime"))
    if not seen and since is not None and b.obs.now < since + timedelta(seconds=UNREAD_RESULT_SECONDS):
        b.requeue.append(RECHECK_SECONDS)  # the pod's exit and message are on their way
        return _checking(b, Reason.CHECKING_INPUT, f"reading the result of the input check Job {name}")
    b.condition(JobConditionType.INPUT_CHECKED, False, Reason.INVALID_INPUT, message)
    if b.status.usage is None:  # no GPU pod ever ran: show the 0
        b.status.usage = usage.account(None, [], usage.gpus_per_pod(b.obs.job), b.obs.now)
    b.fail(Reason.INVALID_INPUT, message)
    return ttl.finish(b)


def _running(b: PlanBuilder, name: str, pods: list[Mapping[str, Any]]) -> Plan:
    """The check has not finished: Pending, and why its pod does not run when it cannot start."""
    active = [p for p in pods if podstate.is_active(p) and not podstate.is_deleting(p)]
    pull = next((m for p in active if (m := podstate.image_pull_failure(p))), None)
    if pull is not None:
        return _checking(b, Reason.IMAGE_PULL_FAILED, f"the input check's image cannot be pulled: {pull}")
    unsched = next((m for p in active if (m := podstate.unschedulable(p))), None)
    if unsched is not None:
        return _checking(b, Reason.UNSCHEDULABLE, f"the input check's pod cannot be scheduled: {unsched}")
    retries = sum(1 for p in pods if podstate.pod_phase(p) == "Failed")
    note = f" (try {retries + 1}: an earlier try failed, the Job controller retries with backoff)" if retries else ""
    return _checking(b, Reason.CHECKING_INPUT, f"checking the input on a CPU-only pod (Job {name}){note}")

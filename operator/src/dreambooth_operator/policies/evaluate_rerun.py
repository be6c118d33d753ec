"""Re-evaluation policy: the annotation dreambooth.dev/evaluate (a token the user or `dreambooth evaluate NAME` sets)
asks for the evaluation of a succeeded job's exported model to run again, on the batch Job `<job>-eval`
(evaluate_builders.py: the trainer with `--evaluate`, no training).

- Each token is served once: status.observedEvaluateRequest records the last one served, whatever the outcome, and
  the condition Reevaluated tells the outcome (one event per transition).
- Served only for a Succeeded job with spec.evaluation enabled, an exported model and pods that the operator's
  restrictions allow (policies/restrictions.py is not applied to finished jobs); otherwise the request is recorded at
  once with Reevaluated False, reason ReevaluationNotPossible, and a message that says why.
- While the Job runs: Reevaluated False, reason Reevaluating (the phase stays Succeeded, the old scores stay). A Job of
  an earlier request is deleted first (Foreground), and the new one created once it is gone.
- The Job completed: its pod's termination message replaces status.outputs' evaluation fields (scores, score,
  evaluationUri, qualityGate, qualityGateReason) and the QualityGateFailed condition; Reevaluated True.
- The Job failed (invalid input at once, anything else after one retry): Reevaluated False, reason ReevaluationFailed,
  with the pod's message; the job stays Succeeded with its earlier scores.
- The finished Job stays (its log: `kubectl logs job/<job>-eval`) until the job's ttlSecondsAfterFinished deletes
  the children (policies/ttl.py), as the training Job does.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final

from pydantic import ValidationError

from dreambooth_api.constants import (
    ANNOTATION_EVALUATE,
    LABEL_COMPONENT,
    Component,
    JobConditionType,
    JobPhase,
    Reason,
)
from dreambooth_api.job import DreamBoothJobSpec, Outputs
from dreambooth_operator import names, ownership, podstate
from dreambooth_operator.plan import Action, ActionKind, Plan, PlanBuilder
from dreambooth_operator.policies import success
from dreambooth_operator.restrictions import violations

RECHECK_SECONDS: Final = 2.0
UNREAD_RESULT_SECONDS: Final = 30.0
"""How long a completed Job waits for its pod (with the scores) to be observed before the result counts as lost."""
EVALUATION_FIELDS: Final = ("evaluation", "score", "evaluationUri", "qualityGate", "qualityGateReason")
"""The status.outputs fields an evaluation writes (all replaced: a field the new result lacks is cleared)."""


def requested(job: Mapping[str, Any]) -> str | None:
    """The evaluation request on the job (the annotation's value), None when there is none."""
    value = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_EVALUATE)
    return str(value).strip()[:128] or None if value is not None else None


def pending(job: Mapping[str, Any]) -> bool:
    """A request that is not served yet (kopf's filter of the handler that serves requests of finished jobs)."""
    token = requested(job)
    return token is not None and token != (job.get("status") or {}).get("observedEvaluateRequest")


def is_evaluation(obj: Mapping[str, Any]) -> bool:
    return (obj.get("metadata", {}).get("labels") or {}).get(LABEL_COMPONENT) == Component.EVALUATION.value


def why_not(b: PlanBuilder) -> str | None:
    """Why the job's model cannot be evaluated again (None when it can)."""
    phase, outputs = b.status.phase, b.status.outputs
    if phase is not JobPhase.SUCCEEDED:
        state = phase.value if phase else "not started"
        return f"the job is {state}, not Succeeded: only a succeeded job's model is evaluated again"
    try:
        spec = DreamBoothJobSpec.model_validate(b.obs.job.get("spec") or {})
    except ValidationError as err:
        return f"the spec is not valid: {err.errors()[0].get('msg', err)}"
    if not (spec.evaluation or {}).get("enabled"):
        return "spec.evaluation is not enabled: set spec.evaluation (enabled: true) first"
    if outputs is None or not outputs.model_uri:
        return "the job has no exported model (status.outputs.modelUri)"
    broken = violations(spec.pod_template, b.obs.rules)  # the Job's pod is the training pod's (restrictions.py)
    if broken:
        return f"the evaluation pod would break the operator's restrictions: {'; '.join(broken)}"
    return None


def refuse_unfinished(b: PlanBuilder) -> None:
    """A request on a job that has not finished: recorded at once, with why nothing runs (the evaluation of
    spec.evaluation runs after training anyway)."""
    token = requested(b.obs.job)
    if token is None or token == b.status.observed_evaluate_request:
        return
    _refuse(b, token, why_not(b) or "the job has not finished")


def _refuse(b: PlanBuilder, token: str, why: str) -> None:
    b.status.observed_evaluate_request = token
    b.condition(JobConditionType.REEVALUATED, False, Reason.REEVALUATION_NOT_POSSIBLE, f"request {token}: {why}")


def serve(b: PlanBuilder, foreign: list[Mapping[str, Any]]) -> Plan | None:
    """A terminal job: the plan while a request is being served, None when there is none or it is done (the TTL
    policy goes on). `foreign`: batch Jobs with the job's label that another object controls."""
    token = requested(b.obs.job)
    if token is None or token == b.status.observed_evaluate_request:
        return None
    why = why_not(b)
    if why is not None:
        _refuse(b, token, why)
        return None
    name = names.evaluation_job_name(b.job_name)
    current = next((j for j in b.obs.batch_jobs if j["metadata"]["name"] == name), None)
    if current is None:
        # The job stays Succeeded: a name held by another object fails the request (ownership.py), it never blocks.
        blocker = next((j for j in foreign if j["metadata"]["name"] == name), None)
        found = [f for f in [ownership.foreign("Job", blocker, b.obs.job)] if f] if blocker is not None else []
        if b.obs.children is not None:
            found += ownership.foreign_children(b.obs.children, b.obs.job)
        if found:
            _failed(b, token, ownership.conflicts_message(found))
            return None
        b.actions.append(Action(ActionKind.CREATE_EVALUATION, name=name))
        return _running(b, token, f"evaluating the exported model again (Job {name})")
    return _follow(b, token, name, current)


def _follow(b: PlanBuilder, token: str, name: str, current: Mapping[str, Any]) -> Plan | None:
    """The Job `name` exists: replace it when it serves an earlier request, else follow it to its outcome."""
    if _token_of(current) != token or podstate.is_deleting(current):
        if not podstate.is_deleting(current):
            b.actions.append(Action(ActionKind.DELETE_BATCH_JOB, name=name))
        b.requeue.append(RECHECK_SECONDS)
        return _running(b, token, f"waiting for the evaluation Job {name} of an earlier request to go")
    pods = [p for p in b.obs.pods if podstate.controller_uid(p) == str(current["metadata"].get("uid"))]
    return _apply(b, token, name, current, pods)


def _token_of(batch_job: Mapping[str, Any]) -> str | None:
    return ((batch_job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_EVALUATE)


def _running(b: PlanBuilder, token: str, message: str) -> Plan:
    b.condition(JobConditionType.REEVALUATED, False, Reason.REEVALUATING, f"request {token}: {message}")
    return b.plan()


def _apply(
    b: PlanBuilder, token: str, name: str, current: Mapping[str, Any], pods: list[Mapping[str, Any]]
) -> Plan | None:
    finished = podstate.job_finished(current)
    if finished is None:
        active = [p for p in pods if podstate.is_active(p) and not podstate.is_deleting(p)]
        stuck = next((m for p in active if (m := podstate.image_pull_failure(p) or podstate.unschedulable(p))), None)
        retries = sum(1 for p in pods if podstate.pod_phase(p) == "Failed")
        note = f" (try {retries + 1})" if retries else ""
        return _running(
            b, token, f"evaluating the exported model again (Job {name}){note}" + (f": {stuck}" if stuck else "")
        )
    kind, cond = finished
    done = next((p for p in pods if podstate.exit_code(p) == 0), None)
    if kind == "Complete" and done is None:
        since = podstate.parse_time(cond.get("lastTransitionTime"))
        if since is not None and b.obs.now < since + timedelta(seconds=UNREAD_RESULT_SECONDS):
            b.requeue.append(RECHECK_SECONDS)  # the pod with the scores is on its way
            return _running(b, token, f"reading the result of the evaluation Job {name}")
        _failed(b, token, f"the evaluation Job {name} completed, but its pod (with the scores) is gone")
        return None
    if kind == "Complete" and done is not None:
        _record(b, token, podstate.termination_message(done))
        return None
    last = sorted(pods, key=lambda p: str(p.get("metadata", {}).get("creationTimestamp") or ""))
    detail = podstate.termination_message(last[-1]) if last else {}
    why = detail.get("evaluationError") or detail.get("message") or cond.get("message") or "the Job failed"
    _failed(b, token, f"the evaluation Job {name} failed ({cond.get('reason') or 'Failed'}): {why}")
    return None


def _failed(b: PlanBuilder, token: str, message: str) -> None:
    b.status.observed_evaluate_request = token
    kept = " (the earlier scores stay)" if b.status.outputs and b.status.outputs.evaluation else ""
    b.condition(JobConditionType.REEVALUATED, False, Reason.REEVALUATION_FAILED, f"request {token}: {message}{kept}")


def _record(b: PlanBuilder, token: str, result: Mapping[str, Any]) -> None:
    """The new scores and gate in status.outputs (the model's fields stay), and the conditions."""
    if result.get("evaluationError") or not isinstance(result.get("evaluation"), Mapping):
        why = result.get("evaluationError") or result.get("message") or "the result has no scores"
        _failed(b, token, f"the evaluation produced no scores: {why}")
        return
    old = b.status.outputs.to_wire() if b.status.outputs else {}
    new = success.outputs(result, None)
    merged = {k: v for k, v in old.items() if k not in (*EVALUATION_FIELDS, "evaluationError")}
    merged.update({k: v for k, v in new.items() if k in EVALUATION_FIELDS})
    b.status.outputs = Outputs.model_validate(merged)
    if b.status.outputs.quality_gate in (None, "skipped"):
        b.status.conditions = [c for c in b.status.conditions if c.type != JobConditionType.QUALITY_GATE_FAILED]
    success.quality_gate(b, b.status.outputs)
    b.status.observed_evaluate_request = token
    scores = ", ".join(f"{k} {v:.4g}" for k, v in sorted((b.status.outputs.evaluation or {}).items()))
    gate = b.status.outputs.quality_gate
    b.condition(
        JobConditionType.REEVALUATED,
        True,
        Reason.REEVALUATED,
        f"request {token}: {scores or 'no scores'}" + (f"; quality gate {gate}" if gate else ""),
    )

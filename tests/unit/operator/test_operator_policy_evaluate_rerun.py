"""Re-evaluation policy: the annotation dreambooth.dev/evaluate on a succeeded job with spec.evaluation runs the Job
`<job>-eval` once per token; its result replaces the scores, the gate and QualityGateFailed; a failed Job or a job
that cannot be evaluated is recorded with the reason, and the job stays as it was (Succeeded, earlier scores)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from dreambooth_operator.handlers.jobs import record_metrics
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.observed import Observed
from dreambooth_operator.plan import Action, ActionKind, Plan
from dreambooth_operator.policies.evaluate_rerun import pending
from dreambooth_operator.reconcile import reconcile
from dreambooth_operator.restrictions import PodRestrictions, Rules
from tests.infra.wrappers import T0, BatchJobWrapper, PodWrapper, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import NOW, after, cond, reasons, run

EVALUATE = "dreambooth.dev/evaluate"
EVAL_LABELS = {"dreambooth.dev/job-name": "cat", "dreambooth.dev/component": "evaluation"}
OLD = {"dino": 0.2, "conceptPreservation": 1.0}
NEW = {"dino": 0.61, "clipI": 0.8, "conceptPreservation": 3.0}
SUCCEEDED = [{"type": "Succeeded", "status": "True", "reason": "TrainingCompleted", "lastTransitionTime": iso(T0)}]
GATE_FAILED = {
    "type": "QualityGateFailed",
    "status": "True",
    "reason": "ScoreBelowMinimum",
    "lastTransitionTime": iso(T0),
}


def succeeded(request: str | None = "t1", evaluation: bool = True, phase: str = "Succeeded") -> dict[str, Any]:
    """A job whose training succeeded with a failed gate (the old scores), with evaluation request `request`."""
    outputs = {"modelUri": "s3://bucket/out/cat/model", "evaluation": OLD, "score": 0.2, "qualityGate": "failed"}
    wrapper = make_job().status(
        phase=phase,
        conditions=[*SUCCEEDED, GATE_FAILED] if phase == "Succeeded" else [],
        outputs=outputs if phase == "Succeeded" else None,
        completionTime=iso(T0),
    )
    if evaluation:
        wrapper._spec["evaluation"] = {"enabled": True, "dinoModel": {"tiny": True}, "clipModel": {"tiny": True}}
    if request is not None:
        wrapper.annotation(EVALUATE, request)
    return wrapper.obj()


def eval_job(job: dict[str, Any], request: str = "t1") -> BatchJobWrapper:
    wrapper = make_batch_job(job)
    meta = wrapper._obj["metadata"]
    meta.update({"name": "cat-eval", "uid": "uid-cat-eval", "labels": dict(EVAL_LABELS)})
    meta["annotations"] = {EVALUATE: request}
    return wrapper


def eval_pod(job: dict[str, Any], n: int = 0) -> PodWrapper:
    wrapper = make_pod(job, uid=f"pod-eval-{n}").scheduled()
    meta = wrapper._obj["metadata"]
    meta.update({"name": f"cat-eval-{n}xyzw", "labels": dict(EVAL_LABELS)})
    meta["ownerReferences"][0].update({"name": "cat-eval", "uid": "uid-cat-eval"})
    return wrapper


def served(plan: Plan) -> str | None:
    return plan.status.observed_evaluate_request


def test_a_request_runs_the_eval_job_and_its_scores_replace_the_old_ones() -> None:
    job = succeeded()
    assert pending(job)
    plan = run(job)
    assert plan.actions == [Action(ActionKind.CREATE_EVALUATION, name="cat-eval")]
    assert plan.status.phase == "Succeeded"  # the job stays Succeeded, with its old scores, while it runs
    assert plan.status.outputs is not None
    assert plan.status.outputs.evaluation == OLD
    assert cond(plan, "Reevaluated") == ("False", "Reevaluating")
    assert reasons(plan) == [("Normal", "Reevaluating")]
    assert not plan.finished
    assert served(plan) is None

    job = after(job, plan)
    running = run(job, [eval_job(job).obj()], [eval_pod(job).running().obj()])
    assert running.actions == []
    assert reasons(running) == []
    assert not running.finished

    result = {"status": "succeeded", "evaluation": NEW, "evaluationUri": "s3://bucket/out/cat/evaluation"}
    result |= {"qualityGate": "passed", "qualityGateReason": "both means reach minScore 2"}
    done = run(job, [eval_job(job).complete().obj()], [eval_pod(job).exited(0, result).obj()])
    outputs = done.status.outputs
    assert outputs is not None
    assert (outputs.evaluation, outputs.score, outputs.quality_gate) == (NEW, 0.61, "passed")
    assert outputs.model_uri == "s3://bucket/out/cat/model"  # the model's fields stay
    assert cond(done, "QualityGateFailed") == ("False", "QualityGatePassed")
    assert cond(done, "Reevaluated") == ("True", "Reevaluated")
    assert served(done) == "t1"
    assert done.finished
    assert ("Normal", "Reevaluated") in reasons(done)
    assert done.actions == []  # the finished Job stays (no TTL)
    assert not pending(after(job, done))
    # Served once: the same token again changes nothing.
    again = run(after(job, done), [eval_job(job).complete().obj()], [eval_pod(job).exited(0, result).obj()])
    assert again.actions == []
    assert reasons(again) == []
    assert again.finished


def test_a_new_token_replaces_the_eval_job_of_the_earlier_request() -> None:
    job = succeeded("t2")
    job["status"]["observedEvaluateRequest"] = "t1"
    plan = run(job, [eval_job(job, "t1").complete().obj()])
    assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-eval")]
    assert cond(plan, "Reevaluated") == ("False", "Reevaluating")
    assert plan.requeue_after is not None
    gone = run(after(job, plan))
    assert gone.actions == [Action(ActionKind.CREATE_EVALUATION, name="cat-eval")]


def test_a_failed_eval_job_is_recorded_with_its_message_and_the_job_stays_succeeded() -> None:
    job = succeeded()
    message = {"status": "failed", "reason": "EvaluationFailed", "evaluationError": "OSError: no CLIP weights"}
    plan = run(job, [eval_job(job).failed().obj()], [eval_pod(job).exited(11, message).obj()])
    assert plan.status.phase == "Succeeded"
    assert plan.status.outputs is not None
    assert plan.status.outputs.evaluation == OLD
    assert cond(plan, "QualityGateFailed") == ("True", "ScoreBelowMinimum")
    reevaluated = next(c for c in plan.status.conditions if c.type == "Reevaluated")
    assert (reevaluated.status.value, reevaluated.reason) == ("False", "ReevaluationFailed")
    assert "OSError: no CLIP weights" in (reevaluated.message or "")
    assert ("Warning", "ReevaluationFailed") in reasons(plan)
    assert served(plan) == "t1"
    assert plan.finished


def test_a_completed_job_whose_pod_is_not_seen_waits_for_it_then_fails_the_request() -> None:
    job = succeeded()
    complete = eval_job(job).complete().obj()
    complete["status"]["conditions"][0]["lastTransitionTime"] = iso(NOW)
    waiting = run(job, [complete])
    assert cond(waiting, "Reevaluated") == ("False", "Reevaluating")
    assert served(waiting) is None
    late = run(job, [complete], now=NOW + timedelta(minutes=1))
    assert cond(late, "Reevaluated") == ("False", "ReevaluationFailed")
    assert served(late) == "t1"


@pytest.mark.parametrize(
    ("job", "why"),
    [
        (succeeded(evaluation=False), "spec.evaluation is not enabled"),
        (succeeded(phase="Failed"), "the job is Failed, not Succeeded"),
        (succeeded(phase="Running"), "the job is Running, not Succeeded"),
    ],
)
def test_a_job_that_cannot_be_evaluated_records_why_and_runs_nothing(job: dict[str, Any], why: str) -> None:
    plan = run(job)
    assert all(a.kind is not ActionKind.CREATE_EVALUATION for a in plan.actions)
    reevaluated = next(c for c in plan.status.conditions if c.type == "Reevaluated")
    assert (reevaluated.status.value, reevaluated.reason) == ("False", "ReevaluationNotPossible")
    assert why in (reevaluated.message or "")
    assert served(plan) == "t1"
    assert ("Warning", "ReevaluationNotPossible") in reasons(plan)
    if job["status"]["phase"] != "Running":  # a running job goes on as the other policies say
        assert plan.status.phase == job["status"]["phase"]


def test_an_image_the_restrictions_forbid_never_runs() -> None:
    job = succeeded()
    job["spec"]["podTemplate"] = {"image": "evil.example/trainer:1"}
    rules = Rules(PodRestrictions(image_prefixes=("registry.corp/",)))
    plan = reconcile(Observed(job=job, batch_jobs=[], pods=[], now=NOW, rules=rules))
    assert plan.actions == []
    reevaluated = next(c for c in plan.status.conditions if c.type == "Reevaluated")
    assert reevaluated.reason == "ReevaluationNotPossible"
    assert "evil.example/trainer:1" in (reevaluated.message or "")
    assert plan.status.phase == "Succeeded"


def test_no_annotation_changes_nothing() -> None:
    job = succeeded(request=None)
    plan = run(job)
    assert plan.actions == []
    assert plan.finished
    assert not pending(job)
    assert cond(plan, "Reevaluated") is None


def test_the_histogram_observes_the_scores_of_a_request_once_when_it_is_served() -> None:
    job = succeeded()
    result = {"status": "succeeded", "evaluation": NEW, "qualityGate": "passed"}
    done = run(job, [eval_job(job).complete().obj()], [eval_pod(job).exited(0, result).obj()])
    metrics = OperatorMetrics()
    record_metrics(metrics, job, done.status.phase, done)
    count = "dreambooth_operator_evaluation_score_count"
    assert metrics.registry.get_sample_value(count, {"metric": "conceptPreservation"}) == 1
    assert metrics.registry.get_sample_value("dreambooth_operator_evaluation_score_sum", {"metric": "dino"}) == 0.61
    record_metrics(metrics, after(job, done), done.status.phase, done)  # a later reconcile: not again
    assert metrics.registry.get_sample_value(count, {"metric": "conceptPreservation"}) == 1
    failed = run(job, [eval_job(job).failed().obj()], [eval_pod(job).exited(11, {"evaluationError": "x"}).obj()])
    record_metrics(metrics, job, failed.status.phase, failed)  # a failed request has no new scores
    assert metrics.registry.get_sample_value(count, {"metric": "conceptPreservation"}) == 1

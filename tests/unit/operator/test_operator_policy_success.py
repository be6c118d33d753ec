"""Success policy: completion and outputs from rank 0's termination message."""

from __future__ import annotations

import json

from dreambooth_operator.builders import parse_spec
from dreambooth_operator.policies import success
from dreambooth_operator.policies.success import outputs, rank0_result, succeeded
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import NOW, after, attempt_of, builder, reasons, run

JOB = make_job().obj()


def test_succeeded() -> None:
    assert succeeded(make_batch_job(JOB).complete().obj())
    assert not succeeded(make_batch_job(JOB).failed().obj())
    assert not succeeded(make_batch_job(JOB).obj())
    assert not succeeded(None)


def test_outputs_from_the_termination_message() -> None:
    message = {"status": "succeeded", "modelUri": "s3://b/o/model", "samplesUri": "s3://b/o/samples", "steps": 5}
    pods = [make_pod(JOB, rank=1).exited(0, {"modelUri": "wrong"}).obj(), make_pod(JOB).exited(0, message).obj()]
    result = rank0_result(pods)
    assert result == message
    assert outputs({**result, "evaluation": {"clipScore": 0.3, "bad": "x"}}, "s3://b/o") == {
        "modelUri": "s3://b/o/model",
        "samplesUri": "s3://b/o/samples",
        "evaluation": {"clipScore": 0.3},
    }


def test_outputs_fall_back_to_the_storage_layout() -> None:
    assert rank0_result([make_pod(JOB).running().obj()]) == {}
    assert outputs({}, "s3://b/o/") == {"modelUri": "s3://b/o/model", "samplesUri": "s3://b/o/samples"}


def test_success_sets_outputs_and_is_sticky() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    message = {"status": "succeeded", "modelUri": "s3://bucket/out/cat/model", "steps": 10, "finalLoss": 0.9842754602}
    plan = run(job, [make_batch_job(job).complete().obj()], [make_pod(job).exited(0, message).obj()])
    assert plan.status.phase == "Succeeded"
    assert plan.status.progress is not None
    assert plan.status.progress.loss == 0.9843  # the LOSS column, as the progress policy rounds it
    assert plan.status.outputs is not None
    assert plan.status.outputs.model_uri == "s3://bucket/out/cat/model"
    assert plan.status.outputs.samples_uri == "s3://bucket/out/cat/samples"
    assert plan.status.completion_time == NOW
    assert plan.status.progress_text == "10/10"
    assert ("Normal", "TrainingCompleted") in reasons(plan)
    assert plan.finished
    # Terminal phases never change, whatever is observed later.
    later = run(after(job, plan), [make_batch_job(job).failed().obj()], [])
    assert later.status == plan.status
    assert later.events == []


def test_non_finite_results_are_left_out_of_the_status() -> None:
    """A NaN final loss or evaluation score in the termination message must not reach the status (issue 17)."""
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).exited(0, '{"steps": 10, "finalLoss": NaN, "evaluation": {"clipScore": Infinity, "ok": 0.5}}')
    plan = run(job, [make_batch_job(job).complete().obj()], [pod.obj()])
    assert plan.status.phase == "Succeeded"
    assert plan.status.progress is not None
    assert plan.status.progress.loss is None
    assert plan.status.outputs is not None
    assert plan.status.outputs.evaluation == {"ok": 0.5}
    json.dumps(plan.status_wire(), allow_nan=False)


def test_nothing_happens_before_the_batch_job_completes() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    b = builder(job, batch_jobs=[make_batch_job(job).obj()], pods=[make_pod(job).exited(0).obj()])
    assert not success.apply(b, parse_spec(job), attempt_of(b))
    assert b.status.outputs is None

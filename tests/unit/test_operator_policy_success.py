"""Success policy: completion and outputs from rank 0's termination message."""

from __future__ import annotations

from operator_wrappers import make_batch_job, make_job, make_pod

from dreambooth_operator.policies.success import outputs, rank0_result, succeeded

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

"""Exact resume through real `dreambooth-train` processes and a real S3 server.

Run A trains 16 steps without interruption. Run B gets SIGTERM mid-run, exits 12 with a "preempted"
termination message after writing a checkpoint, and a new process resumes it. Run C is SIGKILLed (no
chance to checkpoint) and resumes from the last periodic checkpoint. All three must end with bitwise-equal
trainable weights (CPU) and the same per-step losses in metrics.jsonl. A job with another seed pointed at run A's
output refuses A's checkpoints (exit 10) and leaves them as they are.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load as load_safetensors

from tests.infra.s3 import S3Server
from tests.integration.trainer_runs import TrainerRun, list_keys, put_images, read_object, tiny_job

STEPS = 16


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    name = s3.make_bucket()
    put_images(s3, name, "subject")
    return name


def _final(s3: S3Server, bucket: str, out: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    weights = load_safetensors(read_object(s3, bucket, f"{out}/checkpoints/step-{STEPS:08d}/trainable.safetensors"))
    metrics = [json.loads(x) for x in read_object(s3, bucket, f"{out}/metrics.jsonl").decode().splitlines()]
    return weights, metrics


@pytest.fixture(scope="module")
def uninterrupted(s3: S3Server, bucket: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("a")
    # Validation sampling (only in this run) must not disturb the training stream.
    validation = {"prompts": ["a photo of sks dog"], "intervalSteps": 8, "steps": 2}
    run = TrainerRun(tiny_job(s3, bucket, "a", validation=validation), work, s3.env())
    assert run.wait() == 0, run._details()
    term = run.termination()
    assert term["status"] == "succeeded"
    assert term["steps"] == STEPS
    result = json.loads(read_object(s3, bucket, "a/result.json"))
    assert result == term
    samples = [k for k in list_keys(s3, bucket, "a/samples/") if k.endswith(".png")]
    assert samples == ["a/samples/step-00000008/p0-i0.png", "a/samples/step-00000016/p0-i0.png"]
    assert [e["step"] for e in run.events if e.get("event") == "validation"] == [8, 16]
    # The samples also reach TensorBoard, mirrored next to them in object storage.
    events = [k for k in list_keys(s3, bucket, "a/tensorboard/") if "tfevents" in k]
    assert events, list_keys(s3, bucket, "a/")
    assert read_object(s3, bucket, events[0]).find(b"validation/p0") >= 0
    assert term["samplesUri"] == f"s3://{bucket}/a/samples"
    assert term["modelUri"] == f"s3://{bucket}/a/lora/pytorch_lora_weights.safetensors"
    weights, metrics = _final(s3, bucket, "a")
    return {"weights": weights, "metrics": metrics, "events": run.events}


def _assert_same(a: dict[str, Any], weights: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    assert set(weights) == set(a["weights"])
    for k, v in a["weights"].items():
        assert weights[k].equal(v), f"{k} differs"
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in metrics] == [m["loss"] for m in a["metrics"]]
    assert [m["lr"] for m in metrics] == [m["lr"] for m in a["metrics"]]


def test_sigterm_checkpoints_exits_12_and_resumes_bitwise(
    s3: S3Server, bucket: str, uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    config = tiny_job(s3, bucket, "b")
    first = TrainerRun(config, tmp_path, s3.env(), name="b1")
    first.wait_event(lambda e: e.get("event") == "step" and e["step"] >= 6, "step 6")
    first.signal(signal.SIGTERM)
    assert first.wait() == 12, first._details()
    term = first.termination()
    assert term["status"] == "preempted"
    stopped = term["lastCheckpoint"]["step"]
    assert 6 <= stopped < STEPS
    assert term["lastCheckpoint"]["uri"] == f"s3://{bucket}/b/checkpoints/step-{stopped:08d}"
    assert f"b/checkpoints/step-{stopped:08d}/manifest.json" in list_keys(s3, bucket, "b/checkpoints/")
    assert json.loads(read_object(s3, bucket, "b/result.json"))["status"] == "preempted"

    second = TrainerRun(config, tmp_path, s3.env(), name="b2")
    assert second.wait() == 0, second._details()
    resumed = second.named("resumed")
    assert len(resumed) == 1
    assert resumed[0]["step"] == stopped
    assert resumed[0]["uri"] == term["lastCheckpoint"]["uri"]
    # The resumed process trained only the remaining steps.
    assert second.named("step")[0]["step"] == stopped + 1
    _assert_same(uninterrupted, *_final(s3, bucket, "b"))
    # Retention: the newest two complete checkpoints remain.
    folders = {k.split("/")[2] for k in list_keys(s3, bucket, "b/checkpoints/")}
    assert len(folders) == 2
    assert f"step-{STEPS:08d}" in folders


def test_sigkill_resumes_from_the_last_periodic_checkpoint(
    s3: S3Server, bucket: str, uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    config = tiny_job(s3, bucket, "c")
    first = TrainerRun(config, tmp_path, s3.env(), name="c1")
    first.wait_event(lambda e: e.get("event") == "checkpoint_written" and e["step"] == 8, "checkpoint 8")
    first.wait_event(lambda e: e.get("event") == "step" and e["step"] >= 10, "step 10")
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL

    second = TrainerRun(config, tmp_path, s3.env(), name="c2")
    assert second.wait() == 0, second._details()
    assert [e["step"] for e in second.named("resumed")] == [8]
    assert second.termination()["steps"] == STEPS
    _assert_same(uninterrupted, *_final(s3, bucket, "c"))


def test_another_runs_checkpoints_are_refused_with_exit_10(
    s3: S3Server, bucket: str, uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    checkpoints = list_keys(s3, bucket, "a/checkpoints/")
    kept = {name: read_object(s3, bucket, f"a/{name}") for name in ("config.json", "result.json")}
    run = TrainerRun(tiny_job(s3, bucket, "a", seed=7), tmp_path, s3.env(), name="other")
    assert run.wait() == 10, run._details()
    term = run.termination()
    assert term["reason"] == "InvalidInput"
    assert f"s3://{bucket}/a/checkpoints/step-{STEPS:08d}" in term["message"]
    assert "seed" in term["message"]
    assert "new output.uri" in term["message"]
    assert not run.named("training_started")
    assert list_keys(s3, bucket, "a/checkpoints/") == checkpoints
    # The other run's record of itself is not overwritten either.
    assert {name: read_object(s3, bucket, f"a/{name}") for name in kept} == kept

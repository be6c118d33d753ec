"""End to end: a job with `captions: auto`, `evaluation` and the judge, against the fake OpenAI-compatible VLM.

The operator runs the real trainer on the node agent. Before training rank 0 has the VLM caption the photos (the
.txt sidecars land next to them in storage, and `<output>/captions.json` records the captions trained on); after
export it samples the prompts from the trained and the base model, scores them with tiny DINO/CLIP models, and has
the VLM judge them. The judge's concept score is under `minScore`, so the job ends Succeeded with QualityGateFailed,
every score in status.outputs.evaluation and the operator's histogram, `dreambooth watch` exits 7 and the report
shows the scores and the grid. The VLM's API key reaches the trainer only through the pod's secretKeyRef.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dreambooth_cli.errors import ExitStatus
from dreambooth_trainer.evaluation.judge import CONCEPT_TASK, PROMPT_TASK
from tests.e2e.test_operator_training import TRAIN_TIMEOUT, credentials_secret, keys, phase, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.fake_vlm import FakeVlm, task_responder
from tests.infra.operator import OperatorProcess, apply, condition, get, wait_for
from tests.infra.s3 import S3Server

DREAMBOOTH = str(Path(sys.executable).parent / "dreambooth")
API_KEY = "vlm-e2e-key-7f3a9c"
CAPTION = "a photo of a dog sitting on a wooden floor next to a lamp"
SCORES = {"dino", "clipI", "clipT", "baseDino", "baseClipI", "baseClipT", "conceptPreservation", "promptFollowing"}
# Training (20 tiny steps) plus the evaluation: 2 prompts x 2 samples from the trained and the base model.
TIMEOUT = TRAIN_TIMEOUT + 180


@pytest.fixture
def vlm() -> Iterator[FakeVlm]:
    with FakeVlm() as server:
        server.reset(
            task_responder(
                {
                    "caption": json.dumps({"caption": CAPTION}),
                    CONCEPT_TASK: json.dumps({"reason": "not the same dog", "score": 1}),
                    PROMPT_TASK: json.dumps({"reason": "on the beach as asked", "score": 3}),
                }
            )
        )
        yield server


def evaluation_job(bucket: str, s3: S3Server, base_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": "evaluated"},
        "spec": {
            "baseModel": {"tiny": True},
            "instanceImages": {
                "uri": f"s3://{bucket}/subjects/dog/",
                "prompt": "a photo of sks dog",
                "identifier": "sks",
                "captions": "auto",
            },
            "training": {"maxSteps": 20, "resolution": 64},
            "output": {"uri": f"s3://{bucket}/models/evaluated/"},
            "evaluation": {
                "enabled": True,
                "prompts": ["a {} on the beach", "a red {}"],
                "imagesPerPrompt": 2,
                "numInferenceSteps": 3,
                "dinoModel": {"tiny": True},
                "clipModel": {"tiny": True},
                "judge": True,
                "minScore": 2.0,
            },
            "vlm": {
                "baseUrl": base_url,
                "model": "baidu/ERNIE-4.5-VL-28B-A3B-PT",
                "credentialsSecret": {"name": "vlm-credentials", "key": "apiKey"},
                "extraBody": {"chat_template_kwargs": {"enable_thinking": False}},
                "maxRetries": 1,
                "timeoutSeconds": 30,
            },
            "storage": {
                "endpoint": s3.endpoint,
                "addressingStyle": "path",
                "credentialsSecret": {"name": "s3-credentials"},
            },
        },
    }


def test_captions_evaluation_and_a_failed_quality_gate(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess, vlm: FakeVlm, tmp_path: Path
) -> None:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/", count=2)
    credentials_secret(cluster, s3, namespace)
    cluster.kubectl(
        "create", "secret", "generic", "vlm-credentials", "-n", namespace, f"--from-literal=apiKey={API_KEY}"
    )
    job = evaluation_job(bucket, s3, vlm.base_url)
    name = job["metadata"]["name"]
    apply(cluster, job, namespace)

    dbj = wait_for(
        "Succeeded",
        lambda: get(cluster, "dreamboothjob", name, namespace),
        lambda j: phase(j) in ("Succeeded", "Failed"),
        TIMEOUT,
        op,
    )
    status = dbj["status"]
    assert phase(dbj) == "Succeeded", json.dumps(status, indent=1)

    # Scores, the headline score and the gate in the status; the condition says why.
    outputs = status["outputs"]
    assert set(outputs["evaluation"]) == SCORES, outputs
    assert outputs["evaluation"]["conceptPreservation"] == 1.0
    assert outputs["evaluation"]["promptFollowing"] == 3.0
    for metric in ("dino", "clipI", "clipT", "baseDino", "baseClipI", "baseClipT"):
        assert -1.0 <= outputs["evaluation"][metric] <= 1.0
    assert outputs["score"] == outputs["evaluation"]["dino"]
    assert outputs["qualityGate"] == "failed"
    assert outputs["evaluationUri"] == f"s3://{bucket}/models/evaluated/evaluation"
    gate = condition(dbj, "QualityGateFailed")
    assert gate is not None, status["conditions"]
    assert (gate["status"], gate["reason"]) == ("True", "ScoreBelowMinimum")
    assert "conceptPreservation 1.00 below minScore 2" in gate["message"]
    assert condition(dbj, "Succeeded")["status"] == "True"  # type: ignore[index]
    # The Score column at -o wide.
    wide = cluster.kubectl("get", "dreamboothjob", name, "-n", namespace, "-o", "wide").stdout
    assert "SCORE" in wide.splitlines()[0]
    assert f"{outputs['score']:.3f}"[:4] in wide.splitlines()[1]

    # Captions: a sidecar per photo in storage, and the captions trained on are those.
    s3c = s3.client()
    stored = set(keys(s3, bucket, "subjects/dog/"))
    assert {"subjects/dog/img0.txt", "subjects/dog/img1.txt"} <= stored
    expected = "a photo of a sks dog sitting on a wooden floor next to a lamp"
    for i in range(2):
        body = s3c.get_object(Bucket=bucket, Key=f"subjects/dog/img{i}.txt")["Body"].read().decode()
        assert body.strip() == expected
    trained_on = json.loads(s3c.get_object(Bucket=bucket, Key="models/evaluated/captions.json")["Body"].read())
    assert set(trained_on.values()) == {expected}
    # Per-prompt detail and samples in storage.
    out = set(keys(s3, bucket, "models/evaluated/"))
    assert {"models/evaluated/evaluation.json", "models/evaluated/evaluation/result.json",
            "models/evaluated/evaluation/grid.png"} <= out  # fmt: skip
    assert sum(k.startswith("models/evaluated/evaluation/trained/") for k in out) == 4
    assert sum(k.startswith("models/evaluated/evaluation/base/") for k in out) == 4

    # The VLM saw the key as a bearer token and the provider fields; 2 captions + 4 samples x 2 questions.
    assert len(vlm.requests) == 2 + 4 * 2
    assert {r.headers["authorization"] for r in vlm.requests} == {f"Bearer {API_KEY}"}
    assert all(r.body["chat_template_kwargs"] == {"enable_thinking": False} for r in vlm.requests)
    # The input check asked the endpoint for its models first, with the same key.
    assert condition(dbj, "InputChecked")["reason"] == "InputValid"  # type: ignore[index]
    assert [(r.path, r.headers["authorization"]) for r in vlm.model_requests] == [("/v1/models", f"Bearer {API_KEY}")]
    assert vlm.model_requests[0].at < vlm.requests[0].at
    # The key itself is nowhere the operator writes: the ConfigMap, the status, the events.
    configmaps = cluster.kubectl("get", "configmaps", "-n", namespace, "-o", "json").stdout
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "vlm-credentials" in configmaps  # the reference is there ...
    for text in (configmaps, events, json.dumps(status)):
        assert API_KEY not in text  # ... the value is not

    # The operator's histogram, one observation per metric.
    metrics = op.metrics_text()
    for metric in SCORES:
        assert f'dreambooth_operator_evaluation_score_count{{metric="{metric}"}} 1.0' in metrics, metric

    # The CLI: watch exits 7 on QualityGateFailed; the report shows the scores, the gate and the grid.
    env = {**os.environ, **cluster.env(), "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    watched = subprocess.run(
        [DREAMBOOTH, "watch", name, "-n", namespace], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert watched.returncode == ExitStatus.QUALITY_GATE_FAILED, watched.stderr
    assert "failed its quality gate" in watched.stderr
    report = tmp_path / "report.html"
    made = subprocess.run(
        [DREAMBOOTH, "report", name, "-n", namespace, "-o", str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    html = report.read_text()
    assert "id='evaluation-grid'" in html
    assert "conceptPreservation" in html
    assert "failed: conceptPreservation 1.00 below minScore 2" in html

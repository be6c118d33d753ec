"""End to end: `dreambooth evaluate NAME` evaluates a succeeded job's exported model again, in the cluster.

A job with `evaluation` and the judge trains on the node agent and succeeds under `minScore` (QualityGateFailed, the
fake VLM's concept score 1). The VLM now answers 3; `dreambooth evaluate NAME` sets the annotation
dreambooth.dev/evaluate with a fresh token, the operator (whose loop for this job has ended: it is finished) runs
the Job `<job>-eval` (the trainer with `--evaluate`, Pod Security restricted, no training), and the new scores, the
passed gate and the token land in status and the operator's histogram; the CLI prints them and exits 0. The Job's
pod judged the samples again and the evaluation files in storage are the new ones.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from dreambooth_trainer.evaluation.judge import CONCEPT_TASK, PROMPT_TASK
from tests.e2e.test_evaluation_job import DREAMBOOTH, evaluation_job
from tests.e2e.test_operator_training import TRAIN_TIMEOUT, credentials_secret, phase, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.fake_vlm import FakeVlm, task_responder
from tests.infra.operator import OperatorProcess, apply, condition, event_reasons, get, wait_for
from tests.infra.s3 import S3Server

EVALUATE_TIMEOUT = 300


def judge(concept: int) -> dict[str, str]:
    return {
        CONCEPT_TASK: json.dumps({"reason": "the same dog" if concept >= 2 else "not the same dog", "score": concept}),
        PROMPT_TASK: json.dumps({"reason": "as asked", "score": 3}),
    }


@pytest.fixture
def vlm() -> Iterator[FakeVlm]:
    with FakeVlm() as server:
        server.reset(task_responder(judge(1)))
        yield server


def test_evaluate_name(cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess, vlm: FakeVlm) -> None:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/", count=2)
    credentials_secret(cluster, s3, namespace)
    job = evaluation_job(bucket, s3, vlm.base_url)
    del job["spec"]["instanceImages"]["captions"]  # no captions: this test is about the evaluation
    del job["spec"]["vlm"]["credentialsSecret"]
    job["spec"]["evaluation"].update({"imagesPerPrompt": 1, "baseline": False})
    name = job["metadata"]["name"]
    apply(cluster, job, namespace)
    dbj = wait_for(
        "Succeeded",
        lambda: get(cluster, "dreamboothjob", name, namespace),
        lambda j: phase(j) in ("Succeeded", "Failed"),
        TRAIN_TIMEOUT + 120,
        op,
    )
    assert phase(dbj) == "Succeeded", json.dumps(dbj["status"], indent=1)
    assert dbj["status"]["outputs"]["evaluation"]["conceptPreservation"] == 1.0
    assert condition(dbj, "QualityGateFailed")["status"] == "True"  # type: ignore[index]

    vlm.reset(task_responder(judge(3)))
    env = {**os.environ, **cluster.env()}
    done = subprocess.run(
        [DREAMBOOTH, "evaluate", name, "-n", namespace, "--interval", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=EVALUATE_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    token = done.stderr.split("dreambooth.dev/evaluate=", 1)[1].split(")", 1)[0]
    assert "evaluating the exported model again (Job evaluated-eval)" in done.stderr  # the progress line
    assert "evaluation conceptPreservation: 3" in done.stdout
    assert "quality gate: passed" in done.stdout

    dbj = get(cluster, "dreamboothjob", name, namespace)
    assert dbj is not None
    status = dbj["status"]
    assert status["observedEvaluateRequest"] == token
    assert status["phase"] == "Succeeded"
    assert status["outputs"]["evaluation"]["conceptPreservation"] == 3.0
    assert status["outputs"]["qualityGate"] == "passed"
    assert (condition(dbj, "QualityGateFailed") or {}).get("reason") == "QualityGatePassed"
    assert (condition(dbj, "Reevaluated") or {}).get("status") == "True"
    assert {"Reevaluating", "Reevaluated"} <= event_reasons(cluster, namespace, name)
    # The Job's one pod judged the samples (2 prompts x 1 sample x 2 questions), and wrote the files again.
    assert len(vlm.requests) == 2 * 2
    stored = s3.client().get_object(Bucket=bucket, Key="models/evaluated/evaluation.json")["Body"].read()
    assert json.loads(stored)["conceptPreservation"] == 3.0
    # The operator's histogram: the scores of the training run, then those of the request.
    count = 'dreambooth_operator_evaluation_score_count{metric="conceptPreservation"} 2.0'
    wait_for("the new scores in the histogram", op.metrics_text, lambda text: count in text, 30, op)
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", "dreambooth.dev/component=evaluation", "-o", "json"
        ).stdout
    )["items"]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
    assert pods[0]["spec"]["containers"][0]["args"] == ["--evaluate"]

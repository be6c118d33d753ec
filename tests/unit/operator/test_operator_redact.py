"""Credentials never reach status or events: termination messages (a crash's log tail) are redacted of what
credentials look like, since the operator cannot read the Secrets the pods use (it has no Secret RBAC)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dreambooth_operator.inference import reconcile_inference
from dreambooth_operator.redact import redact
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import run

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION = "FwoGZXIvYXdzEJr//////////wEaDKx8c2VjcmV0c2Vzc2lvbnRva2Vu"
JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJpc3MiOiJrdWJlcm5ldGVzL3NlcnZpY2VhY2NvdW50In0.c2lnbmF0dXJl"
SECRETS = (ACCESS_KEY, SECRET_KEY, SESSION, JWT, "hunter2", "s3cr3t-bearer")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"aws_access_key_id={ACCESS_KEY}", "aws_access_key_id=[REDACTED]"),
        (f"aws_secret_access_key = {SECRET_KEY}", "aws_secret_access_key = [REDACTED]"),
        (f'{{"AWS_SECRET_ACCESS_KEY": "{SECRET_KEY}"}}', '{"AWS_SECRET_ACCESS_KEY": "[REDACTED]"}'),
        (f"AWS_SESSION_TOKEN={SESSION} python train.py", "AWS_SESSION_TOKEN=[REDACTED] python train.py"),
        (f"keys {ACCESS_KEY} {SECRET_KEY}", "keys [REDACTED] [REDACTED]"),
        ("Authorization: Bearer s3cr3t-bearer", "Authorization: Bearer [REDACTED]"),
        (f"token file says {JWT}", "token file says [REDACTED]"),
        ("GET https://user:hunter2@hub.example/x", "GET https://user:[REDACTED]@hub.example/x"),
        ("password: hunter2", "password: [REDACTED]"),
        # What is not a credential stays.
        ("spec.storage.credentialsSecret.name: field required", "spec.storage.credentialsSecret.name: field required"),
        ("NoSuchKey: s3://bkt/photos/a.png", "NoSuchKey: s3://bkt/photos/a.png"),
        ("CUDA out of memory at step 12", "CUDA out of memory at step 12"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


LOG_TAIL = (
    "Traceback (most recent call last):\n"
    f"  botocore: using credentials aws_access_key_id={ACCESS_KEY} aws_secret_access_key={SECRET_KEY}\n"
    f"  AWS_SESSION_TOKEN={SESSION}\n"
    f"  header Authorization: Bearer s3cr3t-bearer; sa token {JWT}\n"
    "  url https://user:hunter2@hub.example/model\n"
    "botocore.exceptions.ClientError: AccessDenied"
)


def _assert_clean(plan_text: str) -> None:
    for secret in SECRETS:
        assert secret not in plan_text
    assert "AccessDenied" in plan_text  # the useful part stays
    assert "[REDACTED]" in plan_text


@pytest.mark.parametrize(
    ("nodes", "code", "message"),
    [
        (1, 10, LOG_TAIL),  # invalid input: the job fails with the trainer's message
        (1, 10, json.dumps({"reason": "InvalidInput", "message": LOG_TAIL})),
        (2, 1, LOG_TAIL),  # a gang restart quotes the failed rank's message
    ],
)
def test_a_termination_message_with_credentials_reaches_status_and_events_redacted(
    nodes: int, code: int, message: str
) -> None:
    job = make_job().nodes(nodes).status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).exited(code, message).obj()
    plan = run(job, [make_batch_job(job).obj()], [pod])
    assert plan.events, "the failure is reported"
    _assert_clean(json.dumps(plan.status_wire()) + json.dumps([e.message for e in plan.events]))


def test_a_serving_pods_load_error_with_credentials_is_redacted() -> None:
    isvc: dict[str, Any] = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "dog", "namespace": "ns", "uid": "uid-dog", "generation": 1},
        "spec": {"model": {"modelUri": "s3://bkt/m"}},
    }
    terminated = {"exitCode": 1, "reason": "Error", "message": LOG_TAIL, "finishedAt": "2026-01-01T00:00:10Z"}
    pod = {
        "metadata": {"name": "dog-1"},
        "status": {"containerStatuses": [{"name": "server", "lastState": {"terminated": terminated}}]},
    }
    plan = reconcile_inference(isvc, None, None, OperatorSettings(), T0, [pod])
    assert plan.status.phase == "Failed"
    _assert_clean(json.dumps(plan.status.to_wire()) + json.dumps(plan.events))

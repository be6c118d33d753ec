"""InferenceService: model resolution from a job, the Deployment/Service builders, and status."""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_wrappers import T0

from dreambooth_operator.inference import build_service, reconcile_inference
from dreambooth_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(trainer_image="trainer:test")
OWNER = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "InferenceService",
    "name": "dog",
    "uid": "uid-dog",
    "controller": True,
    "blockOwnerDeletion": True,
}
LABELS = {
    "dreambooth.dev/inference-service": "dog",
    "dreambooth.dev/component": "inference",
    "app.kubernetes.io/managed-by": "dreambooth-operator",
}


def isvc(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "dog", "namespace": "ns", "uid": "uid-dog", "generation": 2},
        "spec": {"model": {"fromJob": "cat"}, **spec},
    }


def source(phase: str, model_uri: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "message": "boom" if phase == "Failed" else None}
    if model_uri:
        status["outputs"] = {"modelUri": model_uri}
    return {"metadata": {"name": "cat"}, "spec": {"baseModel": {"tiny": True}}, "status": status}


@pytest.mark.parametrize(
    ("job", "phase", "reason"),
    [
        (None, "Failed", "SourceJobNotFound"),
        (source("Running"), "Pending", "WaitingForJob"),
        (source("Failed"), "Failed", "SourceJobFailed"),
    ],
)
def test_unresolved_model(job: dict[str, Any] | None, phase: str, reason: str) -> None:
    plan = reconcile_inference(isvc(), job, None, SETTINGS, T0)
    assert plan.children == []
    assert plan.status.phase == phase
    assert [(c.type, c.status.value, c.reason) for c in plan.status.conditions] == [
        ("ModelResolved", "False", reason),
        ("Ready", "False", reason),
    ]


def test_from_a_succeeded_job() -> None:
    job = source("Succeeded", "s3://bkt/out/model")
    plan = reconcile_inference(isvc(scaling={"replicas": 2}), job, None, SETTINGS, T0)
    deployment, service = plan.children
    assert plan.status.phase == "Loading"
    assert plan.status.model_uri == "s3://bkt/out/model"
    assert plan.status.url == "http://dog.ns.svc:80"
    assert service == build_service(isvc())
    assert deployment["metadata"] == {
        "name": "dog",
        "namespace": "ns",
        "labels": LABELS,
        "ownerReferences": [OWNER],
    }
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"] == {"matchLabels": {"dreambooth.dev/inference-service": "dog"}}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert json.loads(env["DREAMBOOTH_SERVE_CONFIG"]["value"]) == {
        "modelUri": "s3://bkt/out/model",
        "baseModel": {"tiny": True},
        "adapters": [],
        "server": {
            "maxBatchSize": 4,
            "maxImagesPerRequest": 4,
            "maxSteps": 50,
            "maxResolution": 768,
            "defaultScheduler": "euler",
            "defaultSteps": 25,
            "defaultGuidanceScale": 7.5,
        },
        "storage": {"addressingStyle": "auto"},
    }
    assert container["command"] == ["dreambooth-serve"]
    assert container["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    ready = reconcile_inference(isvc(), job, {"status": {"replicas": 1, "readyReplicas": 1}}, SETTINGS, T0)
    assert ready.status.phase == "Ready"
    assert ready.status.ready_replicas == 1
    assert ("Normal", "ReplicasReady") in [(t, r) for t, r, _ in ready.events]


def test_model_uri_with_adapters_auth_and_credentials() -> None:
    spec = {
        "model": {"modelUri": "s3://bkt/base", "baseModel": {"tiny": True}},
        "adapters": [{"name": "a", "uri": "s3://bkt/lora", "weight": 0.5}],
        "auth": {"bearerTokenSecret": {"name": "tok"}},
        "storage": {"credentialsSecret": {"name": "s3"}},
        "resources": {"gpus": 0},
    }
    plan = reconcile_inference(isvc(**spec), None, None, SETTINGS, T0)
    container = plan.children[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["DREAMBOOTH_SERVE_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "tok", "key": "token"}}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert json.loads(env["DREAMBOOTH_SERVE_CONFIG"]["value"])["adapters"] == [
        {"name": "a", "uri": "s3://bkt/lora", "weight": 0.5}
    ]
    assert container["resources"] == {}


@pytest.mark.parametrize(("spec_resource", "expected"), [(None, "example.com/gpu"), ("amd.com/gpu", "amd.com/gpu")])
def test_gpu_resource_is_the_spec_value_or_the_operator_setting(spec_resource: str | None, expected: str) -> None:
    settings = SETTINGS.model_copy(update={"gpu_resource_name": "example.com/gpu"})
    resources: dict[str, Any] = {"gpus": 2} | ({"gpuResourceName": spec_resource} if spec_resource else {})
    spec = {"model": {"modelUri": "s3://bkt/base"}, "resources": resources}
    plan = reconcile_inference(isvc(**spec), None, None, settings, T0)
    container = plan.children[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"requests": {expected: "2"}, "limits": {expected: "2"}}


def test_serving_pods_share_the_model_cache_volume_when_configured() -> None:
    spec = {"model": {"modelUri": "s3://bkt/lora", "baseModel": {"id": "org/sd"}}, "resources": {"gpus": 0}}
    pod = reconcile_inference(isvc(**spec), None, None, SETTINGS, T0).children[0]["spec"]["template"]["spec"]
    assert "volumes" not in pod
    settings = SETTINGS.model_copy(update={"model_cache_volume": {"persistentVolumeClaim": {"claimName": "mc"}}})
    pod = reconcile_inference(isvc(**spec), None, None, settings, T0).children[0]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "mc"}}]
    container = pod["containers"][0]
    assert container["volumeMounts"] == [{"name": "model-cache", "mountPath": "/var/cache/dreambooth"}]
    assert {"name": "DREAMBOOTH_MODEL_CACHE_DIR", "value": "/var/cache/dreambooth"} in container["env"]

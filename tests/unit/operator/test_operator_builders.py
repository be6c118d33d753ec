"""Builders: DreamBoothJob -> ConfigMap, headless Service, Indexed batch Job (whole-manifest comparisons)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from dreambooth_operator.builders import (
    build_batch_job,
    build_configmap,
    build_service,
    parse_spec,
    pod_spec_hash,
    shared_memory_volume,
)
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import JobWrapper, make_job

SETTINGS = OperatorSettings(trainer_image="trainer:test", termination_grace_seconds=60, grace_margin_seconds=10)
OWNER = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "DreamBoothJob",
    "name": "cat",
    "uid": "uid-cat",
    "controller": True,
    "blockOwnerDeletion": True,
}
LABELS = {
    "dreambooth.dev/job-name": "cat",
    "dreambooth.dev/component": "trainer",
    "app.kubernetes.io/managed-by": "dreambooth-operator",
}
RANK = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}


def base_env(attempt: int = 0, nodes: int = 1, nproc: int = 1) -> list[dict[str, Any]]:
    master = f"cat-a{attempt}-0.cat-workers"
    return [
        {"name": "DREAMBOOTH_CONFIG", "valueFrom": {"configMapKeyRef": {"name": "cat-config", "key": "config.json"}}},
        {"name": "DREAMBOOTH_ATTEMPT", "value": str(attempt)},
        {"name": "DREAMBOOTH_BIND_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "DREAMBOOTH_METRICS_PORT", "value": "8080"},
        {"name": "DREAMBOOTH_GRACE_SECONDS", "value": "50"},
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        {"name": "PET_NODE_RANK", "valueFrom": RANK},
        {"name": "PET_MASTER_ADDR", "value": master},
        {"name": "PET_MASTER_PORT", "value": "29500"},
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": "29500"},
        {"name": "WORLD_SIZE", "value": str(nodes * nproc)},
        {"name": "NODE_RANK", "valueFrom": RANK},
    ]


def expected_job(attempt: int = 0) -> dict[str, Any]:
    """The whole batch Job of the default single-node, CPU-only job."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"cat-a{attempt}",
            "namespace": "team-a",
            "labels": {**LABELS, "dreambooth.dev/attempt": str(attempt)},
            "ownerReferences": [OWNER],
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 3,
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [10]},
                    },
                    {
                        "action": "Ignore",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [12]},
                    },
                ]
            },
            "podReplacementPolicy": "Failed",
            "suspend": False,
            "template": {
                "metadata": {"labels": {**LABELS, "dreambooth.dev/attempt": str(attempt)}},
                "spec": {
                    "restartPolicy": "Never",
                    "subdomain": "cat-workers",
                    "terminationGracePeriodSeconds": 60,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "trainer:test",
                            "command": ["dreambooth-train"],
                            "env": base_env(attempt),
                            "ports": [
                                {"name": "metrics", "containerPort": 8080, "protocol": "TCP"},
                                {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz", "port": "metrics"},
                                "periodSeconds": 5,
                                "failureThreshold": 3,
                            },
                            "resources": {},
                            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "runAsNonRoot": True,
                                "seccompProfile": {"type": "RuntimeDefault"},
                            },
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                },
            },
        },
    }


Patch = Callable[[dict[str, Any]], None]


def _container(m: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = m["spec"]["template"]["spec"]["containers"][0]
    return container


def _gpus(m: dict[str, Any]) -> None:
    _container(m)["resources"] = {
        "requests": {"cpu": "8", "memory": "64Gi", "amd.com/gpu": "4"},
        "limits": {"cpu": "8", "memory": "64Gi", "amd.com/gpu": "4"},
    }
    _container(m)["env"] = base_env(nproc=4)
    m["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] = "16Gi"


def _multi_node(m: dict[str, Any]) -> None:
    m["metadata"]["name"] = "cat-a2"
    m["metadata"]["labels"]["dreambooth.dev/attempt"] = "2"
    m["spec"]["template"]["metadata"]["labels"]["dreambooth.dev/attempt"] = "2"
    m["spec"].update({"completions": 3, "parallelism": 3, "backoffLimit": 0})
    _container(m)["env"] = base_env(attempt=2, nodes=3, nproc=2)
    _container(m)["resources"] = {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}}


def _credentials(m: dict[str, Any]) -> None:
    _container(m)["env"] += [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}},
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}},
        },
    ]


def _kueue(m: dict[str, Any]) -> None:
    m["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "gpu-queue"
    m["spec"]["suspend"] = True


def _suspended(m: dict[str, Any]) -> None:
    m["spec"]["suspend"] = True
    m["spec"]["backoffLimit"] = 5


def _overrides(m: dict[str, Any]) -> None:
    pod = m["spec"]["template"]
    pod["metadata"]["labels"] = {"team": "vision", **pod["metadata"]["labels"]}
    pod["metadata"]["annotations"] = {"note": "x"}
    spec = pod["spec"]
    spec["nodeSelector"] = {"gpu": "a100"}
    spec["tolerations"] = [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]
    spec["priorityClassName"] = "low"
    spec["imagePullSecrets"] = [{"name": "regcred"}]
    spec["serviceAccountName"] = "trainer"
    c = _container(m)
    c["image"] = "my/trainer:1"
    c["imagePullPolicy"] = "Always"
    c["env"] = [*base_env(), {"name": "HF_HOME", "value": "/cache"}]


CASES: list[tuple[str, JobWrapper, int, Patch | None]] = [
    ("single-node-cpu", make_job(), 0, None),
    ("gpus-and-resources", make_job().gpus(4, "amd.com/gpu").cpu_memory("8", "64Gi", "16Gi"), 0, _gpus),
    ("multi-node-gang-attempt-2", make_job().nodes(3).gpus(2), 2, _multi_node),
    ("s3-credentials-by-secretKeyRef", make_job().storage(secret="s3-creds"), 0, _credentials),
    ("kueue-created-suspended", make_job().queue("gpu-queue"), 0, _kueue),
    ("user-suspend", make_job().suspend().run_policy(backoffLimit=5), 0, _suspended),
    (
        "pod-template-overrides",
        make_job().pod_template(
            image="my/trainer:1",
            imagePullPolicy="Always",
            nodeSelector={"gpu": "a100"},
            tolerations=[{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            priorityClassName="low",
            imagePullSecrets=[{"name": "regcred"}],
            serviceAccountName="trainer",
            env=[{"name": "HF_HOME", "value": "/cache"}],
            labels={"team": "vision"},
            annotations={"note": "x"},
        ),
        0,
        _overrides,
    ),
]


@pytest.mark.parametrize(("case", "job", "attempt", "patch"), CASES, ids=[c[0] for c in CASES])
def test_batch_job(case: str, job: JobWrapper, attempt: int, patch: Patch | None) -> None:
    expected = expected_job()
    if patch is not None:
        patch(expected)
    expected["metadata"]["annotations"] = {"dreambooth.dev/pod-spec-hash": pod_spec_hash(parse_spec(job.obj()))}
    assert build_batch_job(job.obj(), attempt, SETTINGS) == expected, case


def test_kueue_label_is_the_queue_only_on_the_job_not_the_pods() -> None:
    manifest = build_batch_job(make_job().queue("q").obj(), 0, SETTINGS)
    assert "kueue.x-k8s.io/queue-name" not in manifest["spec"]["template"]["metadata"]["labels"]


def test_user_env_overrides_a_non_reserved_default_in_place_of_duplicating_it() -> None:
    job = make_job().storage(secret="s").pod_template(env=[{"name": "AWS_ACCESS_KEY_ID", "value": "x"}]).obj()
    env = build_batch_job(job, 0, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "AWS_ACCESS_KEY_ID"] == [{"name": "AWS_ACCESS_KEY_ID", "value": "x"}]


def test_service() -> None:
    assert build_service(make_job().obj()) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "cat-workers", "namespace": "team-a", "labels": LABELS, "ownerReferences": [OWNER]},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"dreambooth.dev/job-name": "cat", "dreambooth.dev/component": "trainer"},
            "ports": [
                {"name": "rendezvous", "port": 29500, "targetPort": 29500},
                {"name": "metrics", "port": 8080, "targetPort": 8080},
            ],
        },
    }


def test_configmap_holds_the_trainer_config() -> None:
    job = make_job().training(maxSteps=5).storage(endpoint="http://127.0.0.1:9000", secret="s").obj()
    manifest = build_configmap(job)
    data = manifest.pop("data")
    assert manifest == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cat-config", "namespace": "team-a", "labels": LABELS, "ownerReferences": [OWNER]},
    }
    assert json.loads(data["config.json"]) == {
        "name": "cat",
        "namespace": "team-a",
        "baseModel": {"tiny": True},
        "instanceImages": {"uri": "s3://bucket/photos/", "prompt": "a photo of sks cat"},
        "output": {"uri": "s3://bucket/out/cat"},
        "training": {"maxSteps": 5},
        "storage": {"endpoint": "http://127.0.0.1:9000"},
    }


def test_builders_do_not_mutate_the_job() -> None:
    job = make_job().nodes(2).storage(secret="s").obj()
    before = copy.deepcopy(job)
    build_batch_job(job, 1, SETTINGS)
    build_service(job)
    build_configmap(job)
    assert job == before


@pytest.mark.parametrize(("spec_resource", "expected"), [(None, "example.com/gpu"), ("amd.com/gpu", "amd.com/gpu")])
def test_gpu_resource_is_the_spec_value_or_the_operator_setting(spec_resource: str | None, expected: str) -> None:
    settings = SETTINGS.model_copy(update={"gpu_resource_name": "example.com/gpu"})
    manifest = build_batch_job(make_job().gpus(2, spec_resource).obj(), 0, settings)
    assert _container(manifest)["resources"] == {"requests": {expected: "2"}, "limits": {expected: "2"}}


def test_model_cache_volume_is_mounted_with_the_trainers_variable_only_when_configured() -> None:
    pod = build_batch_job(make_job().obj(), 0, SETTINGS)["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["dshm"]
    assert "DREAMBOOTH_MODEL_CACHE_DIR" not in {e["name"] for e in pod["containers"][0]["env"]}
    assert "fsGroup" not in pod["securityContext"]

    claim = {"persistentVolumeClaim": {"claimName": "model-cache"}}
    settings = SETTINGS.model_copy(update={"model_cache_volume": claim})
    pod = build_batch_job(make_job().obj(), 0, settings)["spec"]["template"]["spec"]
    assert pod["volumes"][1] == {"name": "model-cache", **claim}
    container = pod["containers"][0]
    assert {"name": "model-cache", "mountPath": "/var/cache/dreambooth"} in container["volumeMounts"]
    assert {"name": "DREAMBOOTH_MODEL_CACHE_DIR", "value": "/var/cache/dreambooth"} in container["env"]
    # The trainer image's group (10001) may write the shared volume.
    assert pod["securityContext"]["fsGroup"] == 10001
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(("size", "empty_dir"), [(None, {}), ("8Gi", {"sizeLimit": "8Gi"})])
def test_dev_shm_comes_from_the_helper_that_serving_pods_use_too(size: str | None, empty_dir: dict[str, str]) -> None:
    # One builder of the memory-backed /dev/shm for training pods (always) and serving pods (with sharedMemory).
    volume, mount = shared_memory_volume(size)
    assert volume == {"name": "dshm", "emptyDir": {"medium": "Memory", **empty_dir}}
    assert mount == {"name": "dshm", "mountPath": "/dev/shm"}
    pod = build_batch_job(make_job().cpu_memory("4", "16Gi", shm=size).obj(), 0, SETTINGS)["spec"]["template"]["spec"]
    assert pod["volumes"][0] == volume
    assert pod["containers"][0]["volumeMounts"][0] == mount


def test_model_cache_volume_setting_is_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_MODEL_CACHE_VOLUME", '{"persistentVolumeClaim": {"claimName": "c"}}')
    assert OperatorSettings().model_cache_volume == {"persistentVolumeClaim": {"claimName": "c"}}


def test_pod_spec_hash_follows_the_pod_settings_only() -> None:
    base = pod_spec_hash(parse_spec(make_job().obj()))
    assert pod_spec_hash(parse_spec(make_job().obj())) == base
    assert pod_spec_hash(parse_spec(make_job().pod_template(image="my/trainer:2").obj())) != base
    assert pod_spec_hash(parse_spec(make_job().storage(secret="other").obj())) != base
    assert pod_spec_hash(parse_spec(make_job().run_policy(backoffLimit=7).obj())) == base


@pytest.mark.parametrize(("automount", "expected"), [(None, False), (False, False), (True, True)])
def test_the_service_account_token_is_mounted_only_when_the_pod_template_asks(
    automount: bool | None, expected: bool
) -> None:
    fields: dict[str, Any] = {"serviceAccountName": "s3-reader"}
    if automount is not None:
        fields["automountServiceAccountToken"] = automount
    pod = build_batch_job(make_job().pod_template(**fields).obj(), 0, SETTINGS)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is expected
    assert pod["serviceAccountName"] == "s3-reader"

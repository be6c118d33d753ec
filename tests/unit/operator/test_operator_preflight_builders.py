"""The input check's batch Job `<job>-check` (preflight_builders.py): whole manifests, table-driven, and the pod
held to what Pod Security "restricted" requires, with the same security settings as the training pod."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from dreambooth_api.constants import ANNOTATION_POD_SPEC_HASH
from dreambooth_operator.builders import build_batch_job, parse_spec, pod_spec_hash
from dreambooth_operator.preflight_builders import build_preflight_job
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
    "dreambooth.dev/component": "preflight",
    "app.kubernetes.io/managed-by": "dreambooth-operator",
}
CONFIG_ENV = {
    "name": "DREAMBOOTH_CONFIG",
    "valueFrom": {"configMapKeyRef": {"name": "cat-config", "key": "config.json"}},
}
NO_GPU = [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}, {"name": "CUDA_VISIBLE_DEVICES", "value": ""}]


def expected() -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "cat-check", "namespace": "team-a", "labels": dict(LABELS), "ownerReferences": [OWNER]},
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 3,
            "activeDeadlineSeconds": 600,
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [10]},
                    },
                ]
            },
            "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "trainer:test",
                            "command": ["dreambooth-train"],
                            "args": ["--preflight"],
                            "env": [CONFIG_ENV, *NO_GPU],
                            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "runAsNonRoot": True,
                                "seccompProfile": {"type": "RuntimeDefault"},
                            },
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                },
            },
        },
    }


Patch = Callable[[dict[str, Any]], None]


def _container(m: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = m["spec"]["template"]["spec"]["containers"][0]
    return container


def _credentials(m: dict[str, Any]) -> None:
    _container(m)["env"][1:1] = [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}},
        },
    ]


def _overrides(m: dict[str, Any]) -> None:
    pod = m["spec"]["template"]
    pod["metadata"] = {"labels": {"team": "a", **LABELS}, "annotations": {"note": "x"}}
    pod["spec"].update({"nodeSelector": {"pool": "gpu"}, "serviceAccountName": "trainer"})
    container = _container(m)
    container["image"] = "registry.corp/trainer:3"
    container["env"] = [CONFIG_ENV, {"name": "OMP_NUM_THREADS", "value": "1"}, *NO_GPU]


def _user_sees_gpus(m: dict[str, Any]) -> None:
    _container(m)["env"] = [CONFIG_ENV, {"name": "CUDA_VISIBLE_DEVICES", "value": "0"}, NO_GPU[0]]


def _kueue(m: dict[str, Any]) -> None:
    pass  # the queue label is the owner's only: the check never waits for the queue


CASES: list[tuple[str, JobWrapper, Patch | None]] = [
    ("defaults", make_job(), None),
    # No GPU request, whatever the job asks for, and no distributed variables, whatever the nodes.
    ("gpus and nodes", make_job().gpus(4).nodes(2).cpu_memory("8", "64Gi", shm="8Gi"), None),
    ("credentials", make_job().storage(secret="s3"), _credentials),
    (
        "podTemplate",
        make_job().pod_template(
            image="registry.corp/trainer:3",
            serviceAccountName="trainer",
            nodeSelector={"pool": "gpu"},
            labels={"team": "a"},
            annotations={"note": "x"},
            env=[{"name": "OMP_NUM_THREADS", "value": "1"}],
        ),
        _overrides,
    ),
    (
        "user GPU env wins",
        make_job().pod_template(env=[{"name": "CUDA_VISIBLE_DEVICES", "value": "0"}]),
        _user_sees_gpus,
    ),
    ("kueue", make_job().queue("gpu"), _kueue),
]


@pytest.mark.parametrize(("case", "job", "patch"), CASES, ids=[c[0] for c in CASES])
def test_preflight_job(case: str, job: JobWrapper, patch: Patch | None) -> None:
    want = expected()
    if patch is not None:
        patch(want)
    # What its pods were built from (policies/preflight.py replaces a check stuck on settings the user fixed).
    want["metadata"]["annotations"] = {ANNOTATION_POD_SPEC_HASH: pod_spec_hash(parse_spec(job.obj()))}
    assert build_preflight_job(job.obj(), SETTINGS) == want


RESTRICTED_CONTAINER_KEYS = ("allowPrivilegeEscalation", "capabilities", "runAsNonRoot", "seccompProfile")


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """What Pod Security "restricted" (v1.30) would refuse in a pod spec (the e2e namespaces enforce it for real)."""
    found = [key for key in ("hostNetwork", "hostPID", "hostIPC") if pod_spec.get(key)]
    found += [f"volume {v['name']}" for v in pod_spec.get("volumes", []) if "hostPath" in v]
    pod_sc = pod_spec.get("securityContext") or {}
    for c in pod_spec["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append("allowPrivilegeEscalation")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []) or (sc.get("capabilities") or {}).get("add"):
            found.append("capabilities")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            found.append("runAsNonRoot")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append("seccompProfile")
        if sc.get("privileged") or any(p.get("hostPort") for p in c.get("ports", [])):
            found.append("privileged or hostPort")
    return found


@pytest.mark.parametrize(("case", "job", "patch"), CASES, ids=[c[0] for c in CASES])
def test_the_pod_passes_pod_security_restricted_as_the_training_pod_does(
    case: str, job: JobWrapper, patch: Patch | None
) -> None:
    check = build_preflight_job(job.obj(), SETTINGS)["spec"]["template"]["spec"]
    train = build_batch_job(job.obj(), 0, SETTINGS)["spec"]["template"]["spec"]
    assert restricted_violations(check) == []
    assert restricted_violations(train) == []
    assert check["securityContext"] == train["securityContext"]
    assert check["containers"][0]["securityContext"] == train["containers"][0]["securityContext"]
    assert check["automountServiceAccountToken"] is False


def test_the_check_names_no_secret_value_and_does_not_mutate_the_job() -> None:
    job = make_job().storage(secret="s3").obj()
    before = copy.deepcopy(job)
    manifest = build_preflight_job(job, SETTINGS)
    assert job == before
    env = _container(manifest)["env"]
    assert all("value" not in e or e["name"] in {"NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"} for e in env)

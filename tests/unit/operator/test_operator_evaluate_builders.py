"""The re-evaluation's batch Job `<job>-eval` (evaluate_builders.py): a whole manifest, and, table-driven, the pod
as one training pod (image, resources of one node, credentials, scheduling, restricted security) without the
distributed setup, with `--evaluate`, a Kueue-admitted Job created suspended."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dreambooth_operator.builders import build_batch_job
from dreambooth_operator.evaluate_builders import build_evaluation_job
from dreambooth_operator.names import max_job_name_length
from tests.infra.wrappers import JobWrapper, make_job
from tests.unit.operator.test_operator_preflight_builders import CONFIG_ENV, OWNER, SETTINGS

LABELS = {
    "dreambooth.dev/job-name": "cat",
    "dreambooth.dev/component": "evaluation",
    "app.kubernetes.io/managed-by": "dreambooth-operator",
}
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def test_the_eval_job_of_a_gpu_job() -> None:
    job = make_job().gpus(1).obj()
    assert build_evaluation_job(job, "t1", SETTINGS) == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "cat-eval",
            "namespace": "team-a",
            "labels": LABELS,
            "annotations": {"dreambooth.dev/evaluate": "t1"},
            "ownerReferences": [OWNER],
        },
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 1,
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [10]},
                    },
                ]
            },
            "suspend": False,
            "template": {
                "metadata": {"labels": LABELS},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 60,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "trainer:test",
                            "command": ["dreambooth-train"],
                            "args": ["--evaluate"],
                            "env": [CONFIG_ENV],
                            "resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}},
                            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                            "securityContext": RESTRICTED,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                },
            },
        },
    }


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = build_evaluation_job(job, "t1", SETTINGS)["spec"]["template"]["spec"]
    return pod


def _trainer_pod(job: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = build_batch_job(job, 0, SETTINGS)["spec"]["template"]["spec"]
    return pod


@pytest.mark.parametrize(
    ("case", "configure"),
    [
        ("8 GPUs on each of 2 nodes: one node's", lambda j: j.nodes(2).gpus(8).cpu_memory("16", "64Gi", shm="8Gi")),
        ("storage credentials", lambda j: j.storage(endpoint="http://s3:9000", secret="s3-creds")),
        (
            "image, scheduling and ServiceAccount",
            lambda j: j.pod_template(
                image="registry/trainer:2",
                nodeSelector={"pool": "a100"},
                tolerations=[{"key": "gpu", "operator": "Exists"}],
                serviceAccountName="trainer",
                env=[{"name": "HF_HOME", "value": "/cache"}],
            ),
        ),
    ],
)
def test_the_pod_is_one_training_pod_without_its_distributed_setup(
    case: str, configure: Callable[[JobWrapper], JobWrapper]
) -> None:
    job = configure(make_job().gpus(1)).obj()
    pod, trainer = _pod(job), _trainer_pod(job)
    container, trained = pod["containers"][0], trainer["containers"][0]
    for key in ("image", "command", "resources", "volumeMounts", "securityContext"):
        assert container[key] == trained[key], (case, key)
    for key in ("securityContext", "volumes", "nodeSelector", "tolerations", "serviceAccountName"):
        assert pod.get(key) == trainer.get(key), (case, key)
    names = [e["name"] for e in container["env"]]
    assert [e for e in trained["env"] if e["name"] in names] == container["env"]
    assert not {"PET_NNODES", "WORLD_SIZE", "MASTER_ADDR", "DREAMBOOTH_ATTEMPT"} & set(names)
    assert "subdomain" not in pod
    assert "ports" not in container  # it serves nothing


def test_a_queued_job_gets_a_suspended_eval_job_that_the_queue_admits() -> None:
    manifest = build_evaluation_job(make_job().gpus(1).queue("team-a-queue").obj(), "t1", SETTINGS)
    assert manifest["spec"]["suspend"] is True
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"


def test_the_longest_job_name_leaves_room_for_the_eval_job() -> None:
    assert len("x" * max_job_name_length() + "-eval") <= 63

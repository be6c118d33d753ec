"""Pure builder of the re-evaluation: a succeeded DreamBoothJob -> the batch Job `<job>-eval` that evaluates its
exported model again (the trainer with `--evaluate`: trainer/evaluation/rerun.py; the decision is
policies/evaluate_rerun.py).

The pod is one training pod without the distributed setup: the trainer image, the job's resources for one node (its
GPUs: sampling the prompts needs them), the same ConfigMap, credentials (the storage's and the VLM's secretKeyRef),
user env, ServiceAccount, pull secrets, scheduling, model cache and /dev/shm, and the same restricted security
context. It trains nothing: it loads `<output>/model` (or `lora/`), samples and scores `spec.evaluation`'s prompts,
writes the detail under `<output>/evaluation/` and returns the scores in its termination message. Exit 10 (no
exported model, no evaluation) fails the Job at once; anything else is retried once. A job that a queue admits
(Kueue's label) gets a Job created suspended, which the queue admits like the training Job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from dreambooth_api.constants import ANNOTATION_EVALUATE, Component
from dreambooth_operator import names
from dreambooth_operator.builders import (
    RESTRICTED_CONTAINER_SECURITY,
    _env,
    _resources,
    adopt,
    apply_scheduling_overrides,
    child_labels,
    invalid_input_rules,
    is_queued_by_kueue,
    model_cache,
    parse_spec,
    pod_metadata,
    pod_security_context,
    shared_memory_volume,
    trainer_image,
)
from dreambooth_operator.layout import CONTAINER_NAME
from dreambooth_operator.preflight_builders import DISTRIBUTED_ENV
from dreambooth_operator.settings import OperatorSettings

EVALUATE_FLAG: Final = "--evaluate"
"""The trainer's argument that evaluates the exported model again instead of training (trainer/cli.py)."""
EVALUATION_BACKOFF_LIMIT: Final = 1
"""One retry of a failed evaluation that is not invalid input (a storage outage, a crash); then it failed."""


def evaluation_env(job: Mapping[str, Any], settings: OperatorSettings) -> list[Any]:
    """The trainer's environment (config, credentials, model cache, the user's env) without the distributed part."""
    return [e for e in _env(job, parse_spec(job), 0, settings) if e["name"] not in DISTRIBUTED_ENV]


def build_evaluation_pod_template(job: Mapping[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    spec = parse_spec(job)
    overrides = spec.pod_template
    metadata = pod_metadata(spec, child_labels(job, Component.EVALUATION))
    cache_volumes, cache_mounts, _ = model_cache(settings)
    shm_volume, shm_mount = shared_memory_volume(spec.resources.shared_memory)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": trainer_image(spec, settings),
        "command": list(settings.trainer_command),
        "args": [EVALUATE_FLAG],
        "env": evaluation_env(job, settings),
        "resources": _resources(spec, settings),
        "volumeMounts": [shm_mount, *cache_mounts],
        "securityContext": dict(RESTRICTED_CONTAINER_SECURITY),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if overrides and overrides.image_pull_policy:
        container["imagePullPolicy"] = overrides.image_pull_policy.value
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": pod_security_context(settings),
        "containers": [container],
        "volumes": [shm_volume, *cache_volumes],
    }
    apply_scheduling_overrides(pod_spec, overrides)
    return {"metadata": metadata, "spec": pod_spec}


def build_evaluation_job(job: Mapping[str, Any], request: str, settings: OperatorSettings) -> dict[str, Any]:
    """The batch Job `<job>-eval` serving evaluation request `request` (owned by the DreamBoothJob)."""
    name = str(job["metadata"]["name"])
    return adopt(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": names.evaluation_job_name(name),
                "labels": child_labels(job, Component.EVALUATION),
                # Which request this Job serves: a Job of an earlier request is replaced, never read as this one's.
                "annotations": {ANNOTATION_EVALUATE: request},
            },
            "spec": {
                "completions": 1,
                "parallelism": 1,
                "backoffLimit": EVALUATION_BACKOFF_LIMIT,
                "podFailurePolicy": {"rules": invalid_input_rules()},
                "suspend": is_queued_by_kueue(job),
                "template": build_evaluation_pod_template(job, settings),
            },
        },
        job,
    )

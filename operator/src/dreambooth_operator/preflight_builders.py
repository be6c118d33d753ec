"""Pure builder of the pre-flight check: a DreamBoothJob -> the batch Job `<job>-check` that checks its input on a CPU
before the first GPU attempt (trainer/preflight.py; the decision is policies/preflight.py).

The pod is the training pod less its GPUs and its distributed setup: the trainer image with `--preflight`, the same
ConfigMap, credentials (secretKeyRef), user env, ServiceAccount, pull secrets and scheduling as the trainer (it
must reach storage as the trainer would), the same restricted security context, and a small CPU and memory request.
The Job controller retries a crash or a storage outage with its own backoff; exit 10 (invalid input) fails the Job
at once (podFailurePolicy). Kueue never sees it: the queue labels the owner's labels would copy are removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from dreambooth_api import env as envnames
from dreambooth_api.constants import ANNOTATION_POD_SPEC_HASH, KUEUE_PRIORITY_CLASS_LABEL, KUEUE_QUEUE_LABEL, Component
from dreambooth_operator import names
from dreambooth_operator.builders import (
    RESTRICTED_CONTAINER_SECURITY,
    _env,
    adopt,
    apply_scheduling_overrides,
    child_labels,
    invalid_input_rules,
    parse_spec,
    pod_metadata,
    pod_security_context,
    pod_spec_hash,
    trainer_image,
)
from dreambooth_operator.layout import CONTAINER_NAME, RESERVED_ENV
from dreambooth_operator.settings import OperatorSettings

PREFLIGHT_FLAG: Final = "--preflight"
"""The trainer's argument that runs the check instead of training (trainer/cli.py)."""
PREFLIGHT_CPU: Final = "500m"
PREFLIGHT_MEMORY: Final = "1Gi"
"""Requests: the trainer's data code imports torch (about 300 MB), and one photo decodes at a time."""
PREFLIGHT_MEMORY_LIMIT: Final = "2Gi"
PREFLIGHT_BACKOFF_LIMIT: Final = 3
"""Retries of a failed check that is not invalid input (a storage outage, a crash), with the Job controller's
exponential backoff (10 s, 20 s, 40 s); after them the check is inconclusive and the GPU Job starts anyway."""
PREFLIGHT_DEADLINE_SECONDS: Final = 600
"""A check still running after this long (hanging storage) is stopped: inconclusive, not invalid input."""
DISTRIBUTED_ENV: Final = RESERVED_ENV - {envnames.CONFIG}
"""The training pod's variables the check has no use for (ranks, rendezvous, progress port, attempt, grace)."""
NO_GPU_ENV: Final = (
    # The CUDA base image sets NVIDIA_VISIBLE_DEVICES=all, which would show a GPU node's devices to a pod that
    # requested none; "void" makes the NVIDIA runtime leave them out.
    {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"},
    {"name": "CUDA_VISIBLE_DEVICES", "value": ""},
)


def preflight_env(job: Mapping[str, Any], settings: OperatorSettings) -> list[Any]:
    """The trainer's environment (config, credentials, model cache, the user's env) without the distributed part,
    and without GPUs (unless the user's env says otherwise)."""
    trainer = [e for e in _env(job, parse_spec(job), 0, settings) if e["name"] not in DISTRIBUTED_ENV]
    given = {e["name"] for e in trainer}
    return trainer + [dict(e) for e in NO_GPU_ENV if e["name"] not in given]


def build_preflight_pod_template(job: Mapping[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    spec = parse_spec(job)
    overrides = spec.pod_template
    metadata = pod_metadata(spec, child_labels(job, Component.PREFLIGHT))
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": trainer_image(spec, settings),
        "command": list(settings.trainer_command),
        "args": [PREFLIGHT_FLAG],
        "env": preflight_env(job, settings),
        "resources": {
            "requests": {"cpu": PREFLIGHT_CPU, "memory": PREFLIGHT_MEMORY},
            "limits": {"memory": PREFLIGHT_MEMORY_LIMIT},
        },
        "securityContext": dict(RESTRICTED_CONTAINER_SECURITY),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if overrides and overrides.image_pull_policy:
        container["imagePullPolicy"] = overrides.image_pull_policy.value
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(settings),
        "containers": [container],
    }
    apply_scheduling_overrides(pod_spec, overrides)
    return {"metadata": metadata, "spec": pod_spec}


def preflight_failure_policy() -> dict[str, Any]:
    """Invalid input fails the Job at once; a disruption (eviction, preemption) is not a failed try."""
    return {"rules": invalid_input_rules()}


def build_preflight_job(job: Mapping[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """The batch Job `<job>-check` (owned by the DreamBoothJob; no GPU)."""
    name = str(job["metadata"]["name"])
    manifest = adopt(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": names.preflight_job_name(name),
                "labels": child_labels(job, Component.PREFLIGHT),
                # What the pods were built from: a check stuck on a bad image is replaced once the spec changes.
                "annotations": {ANNOTATION_POD_SPEC_HASH: pod_spec_hash(parse_spec(job))},
            },
            "spec": {
                "completions": 1,
                "parallelism": 1,
                "backoffLimit": PREFLIGHT_BACKOFF_LIMIT,
                "activeDeadlineSeconds": PREFLIGHT_DEADLINE_SECONDS,
                "podFailurePolicy": preflight_failure_policy(),
                "template": build_preflight_pod_template(job, settings),
            },
        },
        job,
    )
    # kopf.adopt copied the owner's labels: a queue label would hand this CPU-only check to Kueue.
    for key in (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_CLASS_LABEL):
        manifest["metadata"]["labels"].pop(key, None)
    return manifest

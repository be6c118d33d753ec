"""The DreamBoothJob API: the operator-owned parts of the spec, and the status (the operator's contract).

The trainer-owned sections (baseModel, instanceImages, priorPreservation, training, output) are plain dicts
here: the operator passes them through to the trainer unchanged, and their CRD schema is generated from the
trainer's config models (see `TRAINER_SECTIONS` and `dreambooth_api.generate`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from pydantic import ConfigDict, Field, model_validator

from dreambooth_api.common import (
    ApiModel,
    Bool,
    CelRule,
    Condition,
    ContainerResources,
    Int,
    PodTemplateOverrides,
    StorageSpec,
    cel,
    immutable,
    validations,
)
from dreambooth_api.config import (
    CAPTIONS_NEED_VLM,
    JUDGE_NEEDS_VLM,
    LORA_EXPORT_MESSAGE,
    lora_export_allowed,
    vlm_missing,
)
from dreambooth_api.constants import JobPhase
from dreambooth_api.evaluation import METRIC_MODEL_SOURCE_MESSAGE, SecretKeyRef
from dreambooth_api.trainer_config import build_trainer_config

# Spec field (camelCase) -> the trainer model (in dreambooth_api.config) that defines its schema.
TRAINER_SECTIONS: Final = {
    "baseModel": "BaseModelSpec",
    "instanceImages": "InstanceImagesSpec",
    "priorPreservation": "PriorPreservationSpec",
    "training": "TrainingConfig",
    "output": "OutputSpec",
    "evaluation": "EvaluationSpec",
    "vlm": "VlmSpec",
}

# CEL rules for the trainer's cross-field validators (same messages as the trainer's), keyed by trainer model.
# The trainer validates again at start-up; these make `kubectl apply` fail fast with the same words.
# Rules guard defaulted fields with has(): the API server checks a CRD's `default: {}` against the rules
# before nested defaults are filled in (at run time every defaulted field is present).
TRAINER_RULES: Final[dict[str, list[CelRule]]] = {
    "BaseModelSpec": [
        cel(
            "(has(self.id) ? 1 : 0) + (has(self.uri) ? 1 : 0) + ((has(self.tiny) && self.tiny) ? 1 : 0) == 1",
            "baseModel needs exactly one of id, uri or tiny: true",
        )
    ],
    "InstanceImagesSpec": [
        cel("has(self.uri) != has(self.files)", "instanceImages needs exactly one of uri or files"),
    ],
    "PriorPreservationSpec": [
        cel(
            "!has(self.enabled) || !self.enabled || has(self.classPrompt)",
            "priorPreservation.classPrompt is required when prior preservation is enabled",
        )
    ],
    "TrainingConfig": [
        cel(
            "!has(self.lora) || !has(self.method) || self.method == 'lora'",
            "training.lora is only allowed with method: lora",
        ),
    ],
    "MetricModelSpec": [
        cel(
            "(has(self.id) ? 1 : 0) + (has(self.uri) ? 1 : 0) + ((has(self.tiny) && self.tiny) ? 1 : 0) == 1",
            METRIC_MODEL_SOURCE_MESSAGE,
        )
    ],
    "EvaluationSpec": [
        cel(
            "!has(self.minScore) || (has(self.judge) && self.judge)",
            "evaluation.minScore needs evaluation.judge: true",
        ),
    ],
}

# Which spec fields may change after creation. Changing what is trained (or where it goes) would mix two
# different runs in one checkpoint history, so those are immutable; where and how pods run (podTemplate,
# storage connection settings) and the run policy (suspend, deadlines, backoffLimit, TTL) may change.
# podTemplate changes apply from the next attempt (the next gang restart or resume), or at once while the current
# attempt's pods cannot start (image pull or scheduling failures: reconcile.py replaces it). The sections with
# defaults are always present after defaulting, so `self == oldSelf` on each also rejects removing one.
IMMUTABLE_FIELDS: Final = (
    "baseModel",
    "instanceImages",
    "priorPreservation",
    "training",
    "output",
    "resources",
    "evaluation",
    "vlm",
)

SPEC_RULES: Final = [
    cel(
        "!('lora' in self.output.formats) || self.training.method == 'lora'",
        LORA_EXPORT_MESSAGE,
    ),
    cel(
        "self.resources.nodes <= 1 || has(self.output.checkpointUri)",
        "multi-node jobs (resources.nodes > 1) need output.checkpointUri",
    ),
    cel(
        "!has(self.runPolicy) || !has(self.runPolicy.gpuSecondsLimit) || self.resources.gpusPerNode > 0",
        "runPolicy.gpuSecondsLimit needs resources.gpusPerNode above 0 (a CPU job uses no GPU-seconds)",
    ),
    cel(
        "has(self.vlm) || !has(self.evaluation) || !has(self.evaluation.judge) || !self.evaluation.judge",
        JUDGE_NEEDS_VLM,
    ),
    cel(
        "has(self.vlm) || !has(self.instanceImages.captions) || self.instanceImages.captions != 'auto'",
        CAPTIONS_NEED_VLM,
    ),
]


class JobResources(ContainerResources):
    """How many nodes and GPUs the job uses, and each pod's CPU, memory and shared memory."""

    nodes: Int = Field(default=1, ge=1, le=256)
    """Number of nodes (pods in the Indexed Job); more than one runs distributed data parallel training."""
    gpus_per_node: Int = Field(default=1, ge=0, le=16)
    """GPUs per node; one training process per GPU (0 runs one CPU process, for tests)."""


class RunPolicy(ApiModel):
    """How the job runs and retries. Every field may change while the job runs."""

    backoff_limit: Int = Field(default=3, ge=0, le=100)
    """Retryable failures (not preemptions) allowed before the job fails; each restarts from the last checkpoint."""
    active_deadline_seconds: Int | None = Field(default=None, ge=1)
    """Fail the job when it has run this long (Suspended time excluded)."""
    gpu_seconds_limit: Int | None = Field(default=None, ge=1)
    """Fail the job once its pods have used this many GPU-seconds (status.usage.gpuSeconds: every pod of every
    attempt, preempted ones included): a cost cap per subject, for example against a spot pool that keeps
    preempting. The attempt is stopped at the limit (pods run on for their grace period, not counted) and the last
    checkpoint stays. Needs resources.gpusPerNode above 0."""
    ttl_seconds_after_finished: Int | None = Field(default=None, ge=0)
    """Delete the job's pods and batch Job this long after it finished (the DreamBoothJob and its outputs stay)."""
    suspend: Bool = False
    """Suspend the job: its pods are deleted, and setting it back to false resumes from the last checkpoint."""
    preflight: Bool = True
    """Before the first GPU attempt, check the input on a CPU-only pod (the trainer image, no GPU): the instance
    images exist and decode, the buckets exist, the output is writable and the base model is reachable. Invalid input
    fails the job (reason InvalidInput) without a GPU-second used. Not run for a job that resumes, or one created
    suspended."""


class DreamBoothJobSpec(ApiModel):
    """A DreamBooth fine-tuning run: what to train (trainer sections) and where and how it runs."""

    model_config = ConfigDict(json_schema_extra=validations(*SPEC_RULES))

    base_model: dict[str, Any] = Field(json_schema_extra=validations(immutable("baseModel")))
    """The Stable Diffusion base model (trainer section)."""
    instance_images: dict[str, Any] = Field(json_schema_extra=validations(immutable("instanceImages")))
    """The subject's photos and instance prompt (trainer section)."""
    prior_preservation: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=validations(immutable("priorPreservation"))
    )
    """Prior preservation with generated class images (trainer section)."""
    training: dict[str, Any] = Field(default_factory=dict, json_schema_extra=validations(immutable("training")))
    """Training hyper-parameters (trainer section)."""
    output: dict[str, Any] = Field(json_schema_extra=validations(immutable("output")))
    """Where the model goes and in which formats (trainer section)."""
    evaluation: dict[str, Any] | None = Field(default=None, json_schema_extra=validations(immutable("evaluation")))
    """Evaluation after training: DreamBench prompts sampled from the trained (and base) model, scored with DINO,
    CLIP-I and CLIP-T, optionally judged by the VLM with a quality gate (trainer section; docs/evaluation.md)."""
    vlm: dict[str, Any] | None = Field(default=None, json_schema_extra=validations(immutable("vlm")))
    """An OpenAI-compatible vision-language model endpoint for captions: auto and the judge (trainer section)."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Object-storage connection settings and credentials."""
    resources: JobResources = Field(default_factory=JobResources, json_schema_extra=validations(immutable("resources")))
    """Nodes, GPUs and per-pod resources."""
    pod_template: PodTemplateOverrides | None = None
    """Overrides for the training pods (image, scheduling, env, labels); applied from the next attempt, or at once
    while the pods cannot start (image pull or scheduling failures)."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Retries, deadlines, TTL and suspension."""

    def cross_section_errors(self) -> list[str]:
        """The Python twins of SPEC_RULES (same messages), for the operator's own validation.

        Not a model validator: the operator's validation collects every error, and a raising validator would
        hide the others. (The trainer checks its own sections when it parses them.)
        """
        errors = []
        if not lora_export_allowed(self.output.get("formats", []), self.training.get("method", "lora")):
            errors.append(SPEC_RULES[0]["message"])
        if self.resources.nodes > 1 and not self.output.get("checkpointUri"):
            errors.append(SPEC_RULES[1]["message"])
        if self.run_policy.gpu_seconds_limit is not None and self.resources.gpus_per_node == 0:
            errors.append(SPEC_RULES[2]["message"])
        judge = bool((self.evaluation or {}).get("judge"))
        if self.vlm is None:
            errors += vlm_missing(judge, str(self.instance_images.get("captions", "off")))
        return errors

    def vlm_secret(self) -> SecretKeyRef | None:
        """The Secret key of the VLM's API key (`vlm.credentialsSecret`), for the pods' secretKeyRef env."""
        secret = (self.vlm or {}).get("credentialsSecret")
        return SecretKeyRef.model_validate(secret) if isinstance(secret, dict) else None

    def trainer_config(self, name: str, namespace: str) -> dict[str, Any]:
        """The trainer's JobConfig document (DREAMBOOTH_CONFIG), built by the operator's own pure function."""
        job = {"metadata": {"name": name, "namespace": namespace}, "spec": self.model_dump(by_alias=True, mode="json")}
        return build_trainer_config(job)


class Progress(ApiModel):
    """Training progress, from the trainer's /progress endpoint on rank 0."""

    step: int = Field(default=0, ge=0)
    """Optimizer steps done."""
    total_steps: int = Field(default=0, ge=0)
    """Optimizer steps in all (training.maxSteps)."""
    loss: float | None = None
    """The latest (smoothed) training loss."""
    steps_per_second: float | None = Field(default=None, ge=0)
    """Recent training speed."""
    eta_seconds: float | None = Field(default=None, ge=0)
    """Estimated seconds until training finishes."""
    stage: str | None = Field(default=None, max_length=64)
    """The trainer's own stage: Initializing, GeneratingPriors, Training, Checkpointing, Exporting, Evaluating."""
    updated_at: datetime | None = None
    """When the operator last read progress."""
    steps_redone: int = Field(default=0, ge=0)
    """Training steps lost to restarts and done again: at each restart, the step last seen before it minus the
    checkpoint step the new pod resumed from. 0 when every preemption checkpointed before its pod stopped."""


class Restarts(ApiModel):
    """How often the gang of training pods was restarted, by cause."""

    preemptions: int = Field(default=0, ge=0)
    """Restarts after a pod was preempted or evicted (these never use up backoffLimit)."""
    failures: int = Field(default=0, ge=0)
    """Restarts after a retryable failure (these count against backoffLimit)."""
    total: int = Field(default=0, ge=0)
    """preemptions + failures (the Restarts printer column)."""


class CheckpointRef(ApiModel):
    """A complete checkpoint."""

    step: int = Field(ge=0)
    """The optimizer step it was written at."""
    uri: str = Field(max_length=1024)
    """Its folder in object storage."""
    time: datetime | None = None
    """When it was completed."""


class Outputs(ApiModel):
    """Where the results are."""

    model_uri: str | None = Field(default=None, max_length=1024)
    """The exported model (the diffusers folder, or the LoRA weights folder for LoRA-only output)."""
    samples_uri: str | None = Field(default=None, max_length=1024)
    """The validation samples."""
    evaluation: dict[str, float] | None = None
    """Evaluation scores by metric name, when evaluation ran: dino, clipI, clipT (the trained model), baseDino,
    baseClipI, baseClipT (the base model), conceptPreservation, promptFollowing (the judge's means, 0-4)."""
    evaluation_uri: str | None = Field(default=None, max_length=1024)
    """The evaluation's detail: result.json (per-prompt scores, judge reasons), the samples and grid.png."""
    score: float | None = Field(default=None)
    """The headline score: the trained model's DINO (subject fidelity, 0-1), the Score printer column."""
    quality_gate: str | None = Field(default=None, max_length=16)
    """The quality gate: passed, failed, skipped or unknown (evaluation.minScore)."""
    quality_gate_reason: str | None = Field(default=None, max_length=512)
    """Why the gate decided as it did."""
    evaluation_error: str | None = Field(default=None, max_length=512)
    """Why the evaluation produced no scores (the model was still exported)."""


class PodRun(ApiModel):
    """One training pod's hold on its node, from its binding to its stop."""

    uid: str = Field(max_length=64)
    """The pod's uid."""
    start: datetime
    """When the scheduler bound it to a node (its PodScheduled condition; else its startTime)."""
    end: datetime
    """When it stopped (its containers' last finishedAt) once `final`; before that, when it was last seen holding
    its node (a pod that disappears unseen is counted until then)."""
    final: bool = False
    """The pod has stopped and `end` will not change."""


class Usage(ApiModel):
    """What the job cost in node and GPU time: every pod of every attempt, from its binding to its stop. Pods
    that were preempted, failed or stopped for a suspend count too; the time a job waits unscheduled does not."""

    pod_seconds: int = Field(default=0, ge=0)
    """Seconds that the job's pods held their nodes, summed over pods."""
    gpu_seconds: int = Field(default=0, ge=0)
    """podSeconds times resources.gpusPerNode: the GPU time the job was charged (GPU-seconds per subject)."""
    gpu_minutes: float = Field(default=0, ge=0)
    """gpuSeconds in minutes, to one decimal (the GPU-Minutes printer column; the CLI uses the same unit)."""
    gpus_per_pod: int = Field(default=0, ge=0)
    """The GPUs each pod holds (resources.gpusPerNode)."""
    pods: list[PodRun] = Field(default_factory=list)
    """The pods counted: every pod still listed (the batch Jobs keep their failed pods), and the last 16 that are
    gone. Not capped: a cap would have to fold pods that are still listed, and they would be counted again."""
    earlier_pod_seconds: int = Field(default=0, ge=0)
    """podSeconds of pods no longer listed in `pods` (older pods are folded in to keep the status small)."""

    @model_validator(mode="after")
    def _minutes(self) -> Usage:
        """gpuMinutes always follows gpuSeconds (it is never set on its own)."""
        self.gpu_minutes = round(self.gpu_seconds / 60, 1)
        return self


class DreamBoothJobStatus(ApiModel):
    """The observed state of a DreamBoothJob, written by the operator through the status subresource."""

    phase: JobPhase | None = None
    """Pending, Queued, Initializing, Running, Succeeded, Failed or Suspended."""
    reason: str | None = Field(default=None, max_length=128)
    """Why the job is in its phase, in one word: the reason of the condition that explains the phase (for example
    InvalidInput, ImagePullFailed, Unschedulable, QueuedByKueue, Training). The Reason printer column."""
    message: str | None = Field(default=None, max_length=4096)
    """A human-readable summary of the current state (for example why it failed)."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Standard conditions: Valid, Queued, Running, Checkpointed, Suspended, Succeeded, Failed."""
    progress: Progress | None = None
    """Training progress."""
    progress_text: str | None = Field(default=None, max_length=64)
    """step/totalSteps, for example "412/800" (the Progress printer column)."""
    restarts: Restarts = Field(default_factory=Restarts)
    """Gang restarts by cause."""
    attempt: int = Field(default=0, ge=0)
    """The current attempt (0-based); each gang restart starts a new one."""
    last_checkpoint: CheckpointRef | None = None
    """The newest complete checkpoint; a restarted attempt resumes from it."""
    outputs: Outputs | None = None
    """Where the model and samples are (set when the job succeeded)."""
    usage: Usage | None = None
    """Node and GPU time used so far, over all pods and attempts."""
    start_time: datetime | None = None
    """When the first attempt started running."""
    completion_time: datetime | None = None
    """When the job succeeded or failed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the status was computed from."""
    observed_evaluate_request: str | None = Field(default=None, max_length=128)
    """The last evaluation request served (the value of the dreambooth.dev/evaluate annotation); the condition
    Reevaluated tells its outcome. Each request runs once."""


def progress_text(step: int, total_steps: int) -> str:
    """The Progress printer column text, for example "412/800"."""
    return f"{step}/{total_steps}"

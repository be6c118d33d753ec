"""Names shared by the API types, the operator and the tests: group, version, kinds, labels, phases, conditions.

Everything the operator writes into a custom resource's status, or onto a child object's labels, is named here
so that the operator, the CLI and the tests agree on one spelling.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

GROUP: Final = "dreambooth.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

# DreamBoothJob
JOB_KIND: Final = "DreamBoothJob"
JOB_PLURAL: Final = "dreamboothjobs"
JOB_SINGULAR: Final = "dreamboothjob"
JOB_SHORT_NAMES: Final = ("dbj",)

# InferenceService
INFERENCE_KIND: Final = "InferenceService"
INFERENCE_PLURAL: Final = "inferenceservices"
INFERENCE_SINGULAR: Final = "inferenceservice"
INFERENCE_SHORT_NAMES: Final = ("dbis",)

# `kubectl get dreambooth` lists both kinds.
CATEGORIES: Final = ("dreambooth",)

# Labels the operator puts on every child object.
LABEL_PREFIX: Final = GROUP
LABEL_JOB_NAME: Final = f"{GROUP}/job-name"
"""The DreamBoothJob that owns a child (ConfigMap, Service, batch Job, pods)."""
LABEL_INFERENCE_NAME: Final = f"{GROUP}/inference-service"
"""The InferenceService that owns a child (Deployment, Service, pods)."""
LABEL_COMPONENT: Final = f"{GROUP}/component"
"""What a child is: one of `Component`."""
LABEL_ATTEMPT: Final = f"{GROUP}/attempt"
# On each batch Job: a hash of the job's mutable pod settings (spec.podTemplate, spec.storage) it was built from.
ANNOTATION_POD_SPEC_HASH: Final = f"{GROUP}/pod-spec-hash"
"""The gang attempt (0-based) of a training batch Job and its pods."""
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "dreambooth-operator"
# On a single-node DreamBoothJob: UIDs (JSON list, bounded) of its pods already counted as preempted, so that an
# operator restart does not count them twice.
ANNOTATION_COUNTED_PREEMPTIONS: Final = f"{GROUP}/counted-preemptions"
# On a DreamBoothJob, set by the user or `dreambooth evaluate NAME`: a request (any new token, for example a random
# hex string) to evaluate the job's exported model again. The operator serves each token once and records it in
# status.observedEvaluateRequest; on its `<job>-eval` batch Job: the token that Job serves.
ANNOTATION_EVALUATE: Final = f"{GROUP}/evaluate"

# Kueue: this label on a DreamBoothJob is copied onto its batch Job, which Kueue then admits (it unsuspends it).
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_CLASS_LABEL: Final = "kueue.x-k8s.io/priority-class"

# The default operator and trainer images (tags are the chart's appVersion; see docs/contracts.md).
IMAGE_REPOSITORY: Final = "ghcr.io/dreambooth-operator"
DEFAULT_GPU_RESOURCE: Final = "nvidia.com/gpu"


class Component(StrEnum):
    """Values of the `dreambooth.dev/component` label."""

    TRAINER = "trainer"
    PREFLIGHT = "preflight"
    """The CPU-only input check that runs before a job's first GPU attempt (its batch Job `<job>-check`)."""
    INFERENCE = "inference"
    EVALUATION = "evaluation"
    """The evaluation of a succeeded job's exported model, run again on request (its batch Job `<job>-eval`)."""


class JobPhase(StrEnum):
    """`status.phase` of a DreamBoothJob."""

    PENDING = "Pending"
    """Accepted; children not created yet or pods not scheduled."""
    QUEUED = "Queued"
    """The batch Job exists but is suspended by a queue (Kueue) waiting for admission."""
    INITIALIZING = "Initializing"
    """Pods are running and loading the model, images or class priors; no training step yet."""
    RUNNING = "Running"
    """Training steps are being taken."""
    SUCCEEDED = "Succeeded"
    """The model was exported; `status.outputs` says where."""
    FAILED = "Failed"
    """Permanently failed; the Failed condition says why."""
    SUSPENDED = "Suspended"
    """`spec.runPolicy.suspend` is true; pods are deleted and the job resumes from its last checkpoint later."""


TERMINAL_JOB_PHASES: Final = frozenset({JobPhase.SUCCEEDED, JobPhase.FAILED})


class InferencePhase(StrEnum):
    """`status.phase` of an InferenceService."""

    PENDING = "Pending"
    """Waiting for the model (for example the source job has not succeeded yet) or for pods to be scheduled."""
    LOADING = "Loading"
    """Pods are running and loading the model; not ready yet."""
    READY = "Ready"
    """The rollout is complete (no replica serves an older model) and at least one replica serves requests at
    `status.url`."""
    FAILED = "Failed"
    """The service cannot become ready (bad model, source job failed); the Ready condition says why."""


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class JobConditionType(StrEnum):
    """Condition types of a DreamBoothJob."""

    VALID = "Valid"
    """The spec passed the operator's validation (beyond what the CRD schema checks)."""
    QUEUED = "Queued"
    """True while waiting for a queue to admit the job."""
    RUNNING = "Running"
    """True while the training pods run (Initializing or Running phase)."""
    CHECKPOINTED = "Checkpointed"
    """True once a complete checkpoint exists; the message names it."""
    SUSPENDED = "Suspended"
    """True while the job is suspended."""
    SUCCEEDED = "Succeeded"
    """True once the model is exported."""
    FAILED = "Failed"
    """True once the job failed permanently."""
    CHILD_CONFLICT = "ChildConflict"
    """True while an object with a child's name exists that this job does not control (the operator never
    overwrites or deletes it; the job waits); False (reason ConflictResolved) once it is gone."""
    QUALITY_GATE_FAILED = "QualityGateFailed"
    """Set when the job succeeded with `evaluation.minScore`: True when a judge mean is below it (the model is
    exported but not served by subject selectors), False when the gate passed or the judge gave no scores."""
    INPUT_CHECKED = "InputChecked"
    """The pre-flight input check (a CPU-only pod before the first GPU attempt): False with reason CheckingInput while
    it runs; True (InputValid) once it passed; False with reason InvalidInput when it found invalid input (the job
    fails), or InputCheckInconclusive when it could not finish (the GPU Job starts; the trainer checks again)."""
    REEVALUATED = "Reevaluated"
    """The last evaluation request (annotation dreambooth.dev/evaluate): False with reason Reevaluating while its Job
    `<job>-eval` runs; True (Reevaluated) once new scores are in status.outputs; False with reason ReevaluationFailed
    (the Job failed; the job stays Succeeded and keeps its scores) or ReevaluationNotPossible (the job has not
    succeeded, has no spec.evaluation or no exported model)."""


class InferenceConditionType(StrEnum):
    """Condition types of an InferenceService."""

    MODEL_RESOLVED = "ModelResolved"
    """The model URI is known (from `modelUri`, or the source job succeeded)."""
    READY = "Ready"
    """At least one replica is ready and no replica of an older template remains."""
    CHILD_CONFLICT = "ChildConflict"
    """True while an object with a child's name exists that this service does not control (the operator never
    overwrites or deletes it); False (reason ConflictResolved) once it is gone."""


class Reason(StrEnum):
    """Condition reasons (CamelCase, as Kubernetes expects), also used as event reasons."""

    # DreamBoothJob
    SPEC_VALID = "SpecValid"
    INVALID_SPEC = "InvalidSpec"
    INVALID_INPUT = "InvalidInput"
    LOSS_DIVERGED = "LossDiverged"
    """The trainer's loss was not finite for training.maxNonFiniteLossSteps steps in a row (a permanent failure)."""
    CHECKING_INPUT = "CheckingInput"
    INPUT_VALID = "InputValid"
    INPUT_CHECK_INCONCLUSIVE = "InputCheckInconclusive"
    WAITING_FOR_ADMISSION = "WaitingForAdmission"
    ADMITTED = "Admitted"
    PODS_PENDING = "PodsPending"
    PODS_RUNNING = "PodsRunning"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    POD_SPEC_CHANGED = "PodSpecChanged"
    TRAINING = "Training"
    CHECKPOINT_WRITTEN = "CheckpointWritten"
    PREEMPTED = "Preempted"
    RETRYING = "Retrying"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    GPU_SECONDS_LIMIT_EXCEEDED = "GpuSecondsLimitExceeded"
    SUSPENDED_BY_USER = "SuspendedByUser"
    RESUMED = "Resumed"
    TRAINING_COMPLETED = "TrainingCompleted"
    CHILD_DELETED = "ChildDeleted"
    SCORE_BELOW_MINIMUM = "ScoreBelowMinimum"
    QUALITY_GATE_PASSED = "QualityGatePassed"
    JUDGE_UNKNOWN = "JudgeUnknown"
    REEVALUATING = "Reevaluating"
    REEVALUATED = "Reevaluated"
    REEVALUATION_FAILED = "ReevaluationFailed"
    REEVALUATION_NOT_POSSIBLE = "ReevaluationNotPossible"
    # Both kinds
    CHILD_CONFLICT = "ChildConflict"
    """A child's name is taken by an object this resource does not control (condition ChildConflict, and a Warning
    event naming the object), or another field manager changed a field of an owned child."""
    CONFLICT_RESOLVED = "ConflictResolved"
    POLICY_VIOLATION = "PolicyViolation"
    """The pods would break the operator's restrictions (allowed images, ServiceAccounts, priority classes)."""
    # InferenceService
    MODEL_URI_SET = "ModelUriSet"
    WAITING_FOR_JOB = "WaitingForJob"
    SOURCE_JOB_NOT_FOUND = "SourceJobNotFound"
    SOURCE_JOB_FAILED = "SourceJobFailed"
    REPLICAS_READY = "ReplicasReady"
    REPLICAS_NOT_READY = "ReplicasNotReady"
    ROLLING_OUT = "RollingOut"
    SCALED_TO_ZERO = "ScaledToZero"
    MODEL_LOAD_FAILED = "ModelLoadFailed"

"""The InferenceService API: serve a trained model (plus LoRA adapters) with the trainer image's sampling server."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Final, Self

from pydantic import ConfigDict, Field, model_validator

from dreambooth_api.common import (
    ApiModel,
    Condition,
    ContainerResources,
    DnsSubdomain,
    Int,
    PodTemplateOverrides,
    StorageSpec,
    Uri,
    cel,
    validations,
)
from dreambooth_api.constants import InferencePhase
from dreambooth_api.serving import Adapter, ServerLimits

# Spec fields (dotted, camelCase) whose schema comes from a trainer model, as for DreamBoothJob.
TRAINER_SECTIONS: Final = {"model.baseModel": "BaseModelSpec"}


class ModelSource(ApiModel):
    """Which model to serve: the output of a DreamBoothJob, or a model URI."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("has(self.fromJob) != has(self.modelUri)", "model needs exactly one of fromJob or modelUri"),
            cel(
                "!has(self.baseModel) || has(self.modelUri)",
                "model.baseModel goes with modelUri (with fromJob the job's base model is used)",
            ),
        )
    )

    from_job: DnsSubdomain | None = None
    """A DreamBoothJob in the same namespace; its model is served once the job has succeeded."""
    model_uri: Uri | None = None
    """A model in object storage: a diffusers folder, or a LoRA output (then baseModel is needed)."""
    base_model: dict[str, Any] | None = None
    """The base model that a LoRA-only modelUri was trained from (same form as a DreamBoothJob's baseModel)."""

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if (self.from_job is None) == (self.model_uri is None):
            raise ValueError("model needs exactly one of fromJob or modelUri")
        if self.base_model is not None and self.model_uri is None:
            raise ValueError("model.baseModel goes with modelUri (with fromJob the job's base model is used)")
        return self


class Scaling(ApiModel):
    """A fixed number of replicas, or autoscaling between minReplicas and maxReplicas. One replica when empty."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.replicas) || (!has(self.minReplicas) && !has(self.maxReplicas))",
                "scaling.replicas cannot be combined with minReplicas or maxReplicas",
            ),
            cel(
                "has(self.minReplicas) == has(self.maxReplicas)",
                "scaling.minReplicas and scaling.maxReplicas go together",
            ),
            cel(
                "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                "scaling.minReplicas may not exceed scaling.maxReplicas",
            ),
            cel(
                "!has(self.targetInflightRequests) || has(self.maxReplicas)",
                "scaling.targetInflightRequests needs minReplicas and maxReplicas",
            ),
        )
    )

    replicas: Int | None = Field(default=None, ge=0, le=1000)
    """A fixed number of replicas (0 stops serving but keeps the object)."""
    min_replicas: Int | None = Field(default=None, ge=1, le=1000)
    """The fewest replicas when autoscaling."""
    max_replicas: Int | None = Field(default=None, ge=1, le=1000)
    """The most replicas when autoscaling."""
    target_inflight_requests: Int | None = Field(default=None, ge=1, le=1000)
    """Autoscaling target: average in-flight requests per replica (2 when unset)."""

    @model_validator(mode="after")
    def _rules(self) -> Self:
        autoscaling = (self.min_replicas is not None, self.max_replicas is not None)
        if self.replicas is not None and any(autoscaling):
            raise ValueError("scaling.replicas cannot be combined with minReplicas or maxReplicas")
        if autoscaling[0] != autoscaling[1]:
            raise ValueError("scaling.minReplicas and scaling.maxReplicas go together")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("scaling.minReplicas may not exceed scaling.maxReplicas")
        if self.target_inflight_requests is not None and self.max_replicas is None:
            raise ValueError("scaling.targetInflightRequests needs minReplicas and maxReplicas")
        return self


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(ApiModel):
    """A label selector requirement (as in Kubernetes' LabelSelector)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
            ),
        )
    )

    key: str = Field(min_length=1, max_length=317)
    """The label key."""
    operator: SelectorOperator
    """In, NotIn, Exists or DoesNotExist."""
    values: list[str] = Field(default_factory=list, max_length=64)
    """The values for In and NotIn (empty for Exists and DoesNotExist)."""

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if (self.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN)) != bool(self.values):
            raise ValueError("values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist")
        return self


class LabelSelector(ApiModel):
    """A Kubernetes label selector: every matchLabels pair and every matchExpressions requirement must hold (an
    empty selector matches every object)."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    """Labels the object must have, with these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=32)
    """Requirements on the object's labels."""

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            ok = {
                SelectorOperator.IN: present and labels.get(req.key) in req.values,
                SelectorOperator.NOT_IN: not present or labels.get(req.key) not in req.values,
                SelectorOperator.EXISTS: present,
                SelectorOperator.DOES_NOT_EXIST: not present,
            }[req.operator]
            if not ok:
                return False
        return True

    def to_query(self) -> str:
        """The selector in the API server's `labelSelector` query syntax."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for req in self.match_expressions:
            values = ",".join(req.values)
            parts.append(
                {
                    SelectorOperator.IN: f"{req.key} in ({values})",
                    SelectorOperator.NOT_IN: f"{req.key} notin ({values})",
                    SelectorOperator.EXISTS: req.key,
                    SelectorOperator.DOES_NOT_EXIST: f"!{req.key}",
                }[req.operator]
            )
        return ",".join(parts)


class InferenceResources(ContainerResources):
    """GPUs and per-pod resources of each replica."""

    gpus: Int = Field(default=1, ge=0, le=16)
    """GPUs per replica (0 serves on CPU, slowly; for tests)."""


class SecretKeySelector(ApiModel):
    """A key of a Secret in the same namespace."""

    name: DnsSubdomain
    """The Secret's name."""
    key: str = Field(default="token", min_length=1, max_length=253)
    """The key in the Secret."""


class AuthSpec(ApiModel):
    """Request authentication. Without it the server accepts every request."""

    bearer_token_secret: SecretKeySelector
    """Requests must send `Authorization: Bearer <token>` with the token in this Secret."""


class InferenceServiceSpec(ApiModel):
    """Serve a Stable Diffusion model over HTTP with the trainer image's sampling server."""

    model: ModelSource
    """The model to serve."""
    adapters: list[Adapter] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """LoRA adapters loaded on top of the model."""
    subjects: LabelSelector | None = None
    """DreamBoothJobs in the namespace whose LoRA outputs are served as subjects: every Succeeded job that matches
    this label selector, exports lora and has no QualityGateFailed condition is a subject named after the job (a
    request's `model`). The operator publishes them in the ConfigMap `<name>-subjects`, mounted into the server
    pods; a job that succeeds later is servable within a minute or so, with no new pods."""
    scaling: Scaling = Field(default_factory=Scaling)
    """Replicas or autoscaling. With maxReplicas above minReplicas the operator creates a HorizontalPodAutoscaler
    on the Pods metric dreambooth_serve_inflight_requests (exported by the server on /metrics); the cluster needs a
    custom metrics adapter, such as prometheus-adapter, that serves that metric. Equal ones fix the count."""
    resources: InferenceResources = Field(default_factory=InferenceResources)
    """GPUs and per-pod resources."""
    server: ServerLimits = Field(default_factory=ServerLimits)
    """Server limits and request defaults."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Object-storage connection settings and credentials (to load the model and adapters)."""
    auth: AuthSpec | None = None
    """Bearer-token authentication."""
    pod_template: PodTemplateOverrides | None = None
    """Overrides for the server pods."""

    @model_validator(mode="after")
    def _unique_adapters(self) -> Self:
        # The CRD's list-map keyed by name rejects duplicates too ("Duplicate value").
        names = [a.name for a in self.adapters]
        if len(names) != len(set(names)):
            raise ValueError("adapter names must be unique")
        return self


class InferenceServiceStatus(ApiModel):
    """The observed state of an InferenceService, written by the operator through the status subresource."""

    phase: InferencePhase | None = None
    """Pending, Loading, Ready or Failed. Pending while it waits (for its source job to exist and succeed, or for a
    conflicting object to go): it recovers by itself. Failed only when something must be changed: the source job
    failed, the spec breaks the operator's restrictions, or the server cannot load the model."""
    reason: str | None = Field(default=None, max_length=128)
    """Why the service is in its phase, in one word: the Ready condition's reason (for example WaitingForJob,
    ReplicasNotReady, ReplicasReady, SourceJobFailed, ModelLoadFailed). The Reason printer column."""
    message: str | None = Field(default=None, max_length=4096)
    """What happened, and what to do (the Message printer column, at -o wide)."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Standard conditions: ModelResolved, Ready."""
    replicas: int = Field(default=0, ge=0)
    """Replicas that exist."""
    ready_replicas: int = Field(default=0, ge=0)
    """Replicas that are ready to serve (the Ready printer column)."""
    url: str | None = Field(default=None, max_length=1024)
    """The in-cluster URL of the server, for example http://<name>.<namespace>.svc:80."""
    model_uri: str | None = Field(default=None, max_length=1024)
    """The model to serve (resolved from fromJob or modelUri); servedModelUri says whether it is served yet."""
    served_model_uri: str | None = Field(default=None, max_length=1024)
    """The model that the ready replicas serve: modelUri once its rollout has finished, the previous model while
    old replicas remain, unset while no replica is ready."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the status was computed from."""
    subjects: int | None = Field(default=None, ge=0)
    """The servable subjects chosen by spec.subjects (unset without it)."""

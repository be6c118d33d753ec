"""Types shared by the DreamBoothJob and InferenceService specs and statuses.

Every model here is an `ApiModel`: camelCase on the wire, attribute docstrings as descriptions (they become
the CRD's field descriptions and docs/api.md), and unknown fields ignored so that an older operator still
reads objects written against a newer CRD (the API server's pruning and `--validate=strict` reject unknown
fields for users). The trainer's config models (`dreambooth_api.config.Model`) share the same base,
`CamelModel`, and differ only in rejecting unknown fields.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Self, cast

from pydantic import BaseModel, ConfigDict, Field, JsonValue, Strict, StringConstraints, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from dreambooth_api.constants import ConditionStatus

# The scalars of a spec, typed as the API server types them: no lax coercion (true -> 1, "7" -> 7, 1 -> true, "1.5"
# -> 1.5), so that the models reject what the CRD's structural schema rejects (tests/integration/
# test_crd_differential.py); an integer is still a number, as in JSON. Statuses, which only our code writes, stay lax.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]

# An object-storage URI: s3://bucket/prefix or file:///absolute/path (the trainer's config uses the same).
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file:///.*)$"
Uri = Annotated[str, Field(pattern=URI_PATTERN, max_length=1024)]

# Kubernetes name formats (RFC 1123).
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DnsLabel = Annotated[str, Field(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]
DnsSubdomain = Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, min_length=1, max_length=253)]
# A qualified name such as nvidia.com/gpu or a label key.
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)

# A resource quantity (as in resources.requests): an integer, or a string such as "500m", "16Gi" or "1.5".
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[
    Int | Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN, max_length=64)],
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]

# A CEL rule on the object itself: `{"rule": ..., "message": ...}` (the message is what users see).
CelRule = dict[str, str]


def cel(rule: str, message: str) -> CelRule:
    """One `x-kubernetes-validations` entry."""
    return {"rule": rule, "message": message}


def validations(*rules: CelRule) -> dict[str, JsonValue]:
    """`json_schema_extra` that attaches CEL rules to a model or field."""
    return {"x-kubernetes-validations": [cast("JsonValue", dict(rule)) for rule in rules]}


def immutable(field: str) -> CelRule:
    """A transition rule that rejects any change of `field` after creation."""
    return cel("self == oldSelf", f"{field} is immutable")


class CamelModel(BaseModel):
    """Base of every model of the contract: camelCase aliases (snake_case in Python), attribute docstrings as
    descriptions, defaults validated. `ApiModel` ignores unknown fields, `config.Model` rejects them."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase JSON form, as it appears in the custom resource (unset optional fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ApiModel(CamelModel):
    """Base of every API model: unknown fields are ignored (an older operator reads a newer CRD's objects)."""

    model_config = ConfigDict(extra="ignore")


class AddressingStyle(StrEnum):
    AUTO = "auto"
    PATH = "path"
    VIRTUAL = "virtual"


class CredentialsSecretRef(ApiModel):
    """A Secret in the job's namespace that holds S3 credentials (passed to pods only through secretKeyRef)."""

    name: DnsSubdomain
    """The Secret's name."""
    access_key_id_key: str = Field(default="AWS_ACCESS_KEY_ID", min_length=1, max_length=253)
    """The key in the Secret that holds the access key id."""
    secret_access_key_key: str = Field(default="AWS_SECRET_ACCESS_KEY", min_length=1, max_length=253)
    """The key in the Secret that holds the secret access key."""
    session_token_key: str | None = Field(default=None, min_length=1, max_length=253)
    """The key in the Secret that holds a session token, for temporary credentials."""


class StorageSpec(ApiModel):
    """How pods reach object storage. Without credentialsSecret, pods use their ambient identity (IRSA, etc.)."""

    endpoint: str | None = Field(default=None, max_length=512, pattern=r"^https?://[^\s/]+(/.*)?$")
    """The S3 endpoint URL of an S3-compatible server, for example http://minio.storage:9000; AWS when unset."""
    region: str | None = Field(default=None, max_length=64, pattern=r"^[a-z0-9-]+$")
    """The S3 region."""
    addressing_style: AddressingStyle = AddressingStyle.AUTO
    """S3 addressing style: auto, path or virtual (most self-hosted servers need path)."""
    credentials_secret: CredentialsSecretRef | None = None
    """The Secret with the access key id and secret access key."""


class ImagePullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A pod toleration (as core/v1 Toleration), for example for spot or GPU node taints."""

    key: str | None = Field(default=None, max_length=316)
    """The taint key; empty with operator Exists tolerates every taint."""
    operator: TolerationOperator | None = None
    """Exists or Equal (Equal when unset)."""
    value: str | None = Field(default=None, max_length=63)
    """The taint value to match with operator Equal."""
    effect: TaintEffect | None = None
    """The taint effect to match; all effects when unset."""
    toleration_seconds: Int | None = Field(default=None, ge=0)
    """With effect NoExecute: how long the pod stays bound after the taint appears."""


class LocalObjectReference(ApiModel):
    """A reference to an object in the same namespace."""

    name: DnsSubdomain
    """The object's name."""


class EnvVar(ApiModel):
    """An environment variable (as core/v1 EnvVar) added to every container the operator creates."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    """The variable's name."""
    value: str | None = None
    """A literal value."""
    value_from: dict[str, Any] | None = None
    """A core/v1 EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef), not checked here."""


# Every CEL rule below has a Python twin in a model validator with the same message, so that the operator's
# own validation (and the property tests) agree with the API server.
RESERVED_LABEL_PREFIX = "dreambooth.dev/"
RESERVED_LABEL_RULE = cel(
    "self.all(k, !k.startsWith('dreambooth.dev/'))",
    "labels with the dreambooth.dev/ prefix are reserved for the operator",
)


ENV_VALUE_RULE_MESSAGE = "an env entry may set value or valueFrom, not both"


class PodTemplateOverrides(ApiModel):
    """Changes to the pods the operator creates. Each field replaces the operator's default."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("!has(self.env) || self.env.all(e, !(has(e.value) && has(e.valueFrom)))", ENV_VALUE_RULE_MESSAGE)
        )
    )

    image: str | None = Field(default=None, min_length=1, max_length=512)
    """The container image (the trainer image, which also serves models); the operator's default when unset."""
    image_pull_policy: ImagePullPolicy | None = None
    """Always, IfNotPresent or Never."""
    node_selector: dict[str, str] | None = None
    """Node labels the pods must match, for example a GPU model."""
    tolerations: list[Toleration] | None = Field(default=None, max_length=64)
    """Tolerations, for example for spot or GPU taints."""
    affinity: dict[str, Any] | None = None
    """A core/v1 Affinity (node, pod and anti-affinity), passed through unchanged."""
    priority_class_name: str | None = Field(default=None, max_length=253)
    """The pods' PriorityClass; lower priority pods are preempted first."""
    service_account_name: DnsSubdomain | None = None
    """The pods' ServiceAccount (for example one bound to a cloud identity for object storage)."""
    automount_service_account_token: Bool | None = None
    """Mount the ServiceAccount's API token into the pods. Off unless set to true: the trainer and the sampling
    server never call the Kubernetes API. Set it only for a serviceAccountName whose token the pods need (for
    example a cloud identity that exchanges the projected token); the operator's restrictions may limit which
    ServiceAccounts are allowed."""
    image_pull_secrets: list[LocalObjectReference] | None = Field(default=None, max_length=16)
    """Secrets for pulling the image from a private registry."""
    env: list[EnvVar] | None = Field(default=None, max_length=128)
    """Extra environment variables for the container."""
    labels: dict[str, str] | None = Field(default=None, json_schema_extra=validations(RESERVED_LABEL_RULE))
    """Extra pod labels (the dreambooth.dev/ prefix is reserved)."""
    annotations: dict[str, str] | None = None
    """Extra pod annotations."""

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if any(k.startswith(RESERVED_LABEL_PREFIX) for k in self.labels or {}):
            raise ValueError(RESERVED_LABEL_RULE["message"])
        if any(e.value is not None and e.value_from is not None for e in self.env or []):
            raise ValueError(ENV_VALUE_RULE_MESSAGE)
        return self


class ContainerResources(ApiModel):
    """Resources of each pod's container besides GPUs."""

    gpu_resource_name: str | None = Field(default=None, max_length=253, pattern=QUALIFIED_NAME_PATTERN)
    """The extended resource that counts GPUs, for example nvidia.com/gpu or amd.com/gpu; when unset, the
    operator's setting (DREAMBOOTH_OPERATOR_GPU_RESOURCE_NAME, default nvidia.com/gpu) applies."""
    cpu: Quantity | None = None
    """CPU request and limit per pod, for example 8 or "7500m"; the operator's default when unset."""
    memory: Quantity | None = None
    """Memory request and limit per pod, for example "64Gi"; the operator's default when unset."""
    shared_memory: Quantity | None = None
    """Size of the memory-backed /dev/shm volume (data loaders and NCCL need more than the 64Mi default)."""


class Condition(ApiModel):
    """A standard Kubernetes condition."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    """The condition type, for example Running or Failed."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """A CamelCase machine-readable reason for the last transition."""
    message: str = Field(default="", max_length=32768)
    """A human-readable message about the last transition."""
    last_transition_time: datetime
    """When the status last changed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the condition was computed from."""


def set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    """Return `conditions` with `new` in place of the condition of the same type.

    The last transition time stays unchanged when the status did not change, as Kubernetes conventions ask.
    """
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != new.type:
            out.append(cond)
            continue
        found = True
        if cond.status == new.status:
            out.append(new.model_copy(update={"last_transition_time": cond.last_transition_time}))
        else:
            out.append(new)
    if not found:
        out.append(new)
    return out


def find_condition(conditions: list[Condition], type_: str) -> Condition | None:
    """The condition of type `type_`, if present."""
    return next((c for c in conditions if c.type == type_), None)

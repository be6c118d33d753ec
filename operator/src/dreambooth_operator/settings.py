"""Operator configuration: environment variables with the prefix ``DREAMBOOTH_OPERATOR_``.

Every value has a default that works in a cluster; the Helm chart sets the ones a platform usually changes
(watched namespaces, trainer image, log format, peering). Lists are JSON in the environment, for example
``DREAMBOOTH_OPERATOR_NAMESPACES='["team-a","team-b"]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from dreambooth_api import env
from dreambooth_api.constants import DEFAULT_GPU_RESOURCE, IMAGE_REPOSITORY
from dreambooth_operator.restrictions import PodRestrictions, Rules, rules_for

VERSION = "0.1.0"

ENV_PREFIX = "DREAMBOOTH_OPERATOR_"
"""The operator's own settings (not part of the trainer contract, so not in dreambooth_api.env)."""

# Ports (docs/contracts.md). The trainer's /metrics, /progress and /healthz port is part of the trainer contract,
# named here too because the image and chart consistency tests read every port from this module.
TRAINER_METRICS_PORT: Final = env.TRAINER_METRICS_PORT
OPERATOR_METRICS_PORT = 8000
OPERATOR_HEALTH_PORT = 8081

# DREAMBOOTH_OPERATOR_PRIORITY=-1: each process draws its own peering priority (replicas of one Deployment).
RANDOM_PRIORITY = -1
RANDOM_PRIORITY_MAX = 2**31 - 1


def peering_priority(configured: int, draw: Callable[[int, int], int]) -> int:
    """The kopf peering priority: the configured one, or a draw from [1, 2**31 - 1] for RANDOM_PRIORITY.

    ``draw(a, b)`` returns an integer in [a, b] (``secrets.SystemRandom().randint`` in the operator); random
    priorities of two replicas are equal with probability about 5e-10, and then kopf pauses both until one restarts.
    """
    return draw(1, RANDOM_PRIORITY_MAX) if configured == RANDOM_PRIORITY else configured


class OperatorSettings(BaseSettings):
    """Settings of one operator process."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch; empty watches the whole cluster."""
    standalone: bool = False
    """Run without peering (a single replica, or tests). With peering, only one replica handles each object."""
    peering_name: str = "dreambooth-operator"
    """The kopf peering object shared by the replicas of one deployment."""
    peering_mandatory: bool = False
    """Pause (kopf's peering.mandatory) while the peering CRD is missing, instead of running as if alone. The chart
    sets it with more than one replica: replicas that cannot see each other's peering records would all act."""
    priority: int = Field(default=0, ge=RANDOM_PRIORITY)
    """This replica's peering priority (the highest one handles the objects; equal ones pause each other).
    -1 (RANDOM_PRIORITY): a random priority per process, so that the replicas of one Deployment differ."""
    log_format: Literal["json", "plain", "full"] = "json"
    """Log format: JSON lines in production, plain text in development."""
    verbose: bool = False
    """Debug logging."""
    metrics_port: int = OPERATOR_METRICS_PORT
    """Port of the operator's own Prometheus /metrics (0 turns it off)."""
    health_port: int = OPERATOR_HEALTH_PORT
    """Port of kopf's liveness endpoint /healthz (0 turns it off)."""
    bind_address: str = "0.0.0.0"  # noqa: S104 - an in-cluster server must listen on the pod IP
    """Address the metrics and liveness servers bind."""

    trainer_image: str = f"{IMAGE_REPOSITORY}/trainer:{VERSION}"
    """The default trainer image (spec.podTemplate.image overrides it)."""
    trainer_command: list[str] = Field(default_factory=lambda: ["dreambooth-train"])
    """The trainer container's command."""
    model_cache_volume: dict[str, Any] | None = None
    """A core/v1 volume source (JSON), for example ``{"persistentVolumeClaim": {"claimName": "model-cache"}}`` (a
    ReadWriteMany claim of that name in each job namespace) or ``{"ephemeral": ...}``. Training and serving pods mount
    it at /var/cache/dreambooth and keep downloaded base models there, so that a model is fetched once per volume
    instead of once per pod. Unset: each pod downloads into its own scratch space."""
    gpu_resource_name: str = DEFAULT_GPU_RESOURCE
    """The extended resource that counts GPUs (spec.resources.gpuResourceName overrides it)."""
    termination_grace_seconds: int = Field(default=120, ge=10)
    """Pod grace period: the time a preempted trainer has to write its last checkpoint."""
    grace_margin_seconds: int = Field(default=10, ge=0)
    """Part of the grace period kept back from the trainer (DREAMBOOTH_GRACE_SECONDS = grace - margin)."""
    default_backoff_limit: int = Field(default=3, ge=0)
    """Retries of non-preemption failures when spec.runPolicy.backoffLimit is absent."""

    reconcile_interval_seconds: float = Field(default=12.0, gt=0)
    """How often each active job is reconciled (and rank 0's /progress polled) without any event."""
    idle_reconcile_max_seconds: float = Field(default=300.0, gt=0)
    """The longest periodic check of a job that cannot change by itself (its pods wait for a node, or it has none
    running, or it is terminal): its interval doubles from `reconcile_interval_seconds` up to this. Events (the job
    or a child changed) and deadlines still wake it at once; the periodic check only covers a missed event."""
    progress_concurrency: int = Field(default=16, ge=1)
    """At most this many /progress requests in flight at once across all jobs."""
    progress_timeout_seconds: float = Field(default=3.0, gt=0)
    """Timeout of one /progress request."""

    watch_server_timeout_seconds: int = Field(default=300, ge=10)
    """Server-side timeout of each watch request (the API server ends the watch; kopf restarts it)."""
    watch_client_timeout_seconds: int = Field(default=330, ge=10)
    """Client-side timeout of each watch request (catches silently dead connections)."""
    connect_timeout_seconds: int = Field(default=30, ge=1)
    """TCP connect timeout to the API server."""
    request_timeout_seconds: int = Field(default=60, ge=1)
    """Timeout of each non-watch API request."""
    api_threads: int = Field(default=16, ge=1)
    """Threads that make the reconciles' API calls (each call blocks its thread until the API server answers), and
    as many kept-alive connections to the API server. A new job's reconcile makes 5 calls in a row; with asyncio's
    default of 4 + CPUs threads (6 on 2 cores), a burst of jobs queued behind a few threads waiting on a busy API
    server (bench/bench_operator_scale.py). The chart's `extraEnv` sets it (DREAMBOOTH_OPERATOR_API_THREADS)."""
    api_retries: int = Field(default=3, ge=0)
    """Retries of one API request after a connection error, or after a 429/5xx answer to a request that is safe to
    repeat (GET, DELETE with its uid precondition); a POST or PATCH that may have reached the server is not repeated."""

    restrictions: PodRestrictions = Field(default_factory=PodRestrictions)
    """What the pods of any DreamBoothJob or InferenceService may use (JSON): allowed image prefixes, ServiceAccounts
    and priority classes, for example ``{"imagePrefixes": ["registry.corp/dreambooth/"], "serviceAccounts": []}``.
    A rule left out allows anything (restrictions.py)."""
    namespace_restrictions: dict[str, PodRestrictions] = Field(default_factory=dict)
    """Per namespace (JSON object by namespace name): rules that replace the global rule of the same name there."""

    network_policies: bool = True
    """Create a NetworkPolicy per DreamBoothJob (ingress to its pods only from its own pods, and to the /progress
    and /metrics port from the operator) and per InferenceService (the serving port from its namespace)."""
    operator_namespace: str = ""
    """The operator's namespace (the chart sets it): the NetworkPolicies admit the operator's pods from there only.
    Empty: pods with `operator_pod_labels` in any namespace."""
    operator_pod_labels: dict[str, str] = Field(default_factory=dict)
    """Labels of the operator's pods (the chart sets its selector labels), admitted to the trainers' metrics port
    (the operator reads rank 0's /progress). Empty: no operator rule (an operator outside the cluster)."""
    metrics_ingress_from: list[dict[str, Any]] = Field(default_factory=list)
    """More NetworkPolicy peers (JSON, core NetworkPolicyPeer) admitted to the training and serving pods' metrics
    ports, for example Prometheus: ``[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
    "monitoring"}}}]``."""
    serving_ingress_from: list[dict[str, Any]] | None = None
    """The NetworkPolicy peers (JSON) admitted to the serving port of InferenceService pods, in place of the default:
    every pod of the service's own namespace. For example, the namespace and an ingress controller's:
    ``[{"podSelector": {}}, {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}]``.
    An empty list admits no one (but `metrics_ingress_from`)."""

    def rules_for(self, namespace: str) -> Rules:
        """The restrictions in force in `namespace`."""
        return rules_for(namespace, self.restrictions, self.namespace_restrictions, self.trainer_image)

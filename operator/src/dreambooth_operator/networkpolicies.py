"""Pure builders of the NetworkPolicies that admit traffic to a DreamBoothJob's and an InferenceService's pods.

Ingress only (the pods reach object storage, model hubs and DNS; egress stays open):
- training pods: from the same job's pods on every port (the rendezvous port, and the ports NCCL and Gloo open
  between ranks, which are ephemeral), and on the metrics port (/progress, /metrics) from the operator's pods and the
  `metrics_ingress_from` peers (Prometheus);
- serving pods: on the serving port from the service's own namespace (or the `serving_ingress_from` peers) and the
  `metrics_ingress_from` peers.
NetworkPolicies add up: a namespace's own policies may admit more. Each rule has peers: a rule without `from`
would admit every source.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from dreambooth_api.constants import LABEL_COMPONENT, LABEL_INFERENCE_NAME, LABEL_JOB_NAME, Component
from dreambooth_api.env import TRAINER_METRICS_PORT
from dreambooth_operator import names
from dreambooth_operator.builders import adopt, child_labels
from dreambooth_operator.inference_builders import SERVE_PORT
from dreambooth_operator.inference_builders import labels as inference_labels
from dreambooth_operator.settings import OperatorSettings

API_VERSION: Final = "networking.k8s.io/v1"
KIND: Final = "NetworkPolicy"
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"
"""The label the API server puts on every namespace: its name."""


def operator_peers(settings: OperatorSettings) -> list[dict[str, Any]]:
    """The operator's pods: its labels in its namespace (any namespace when that is not configured); none when its
    labels are not configured (an operator outside the cluster)."""
    if not settings.operator_pod_labels:
        return []
    peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(settings.operator_pod_labels)}}
    peer["namespaceSelector"] = (
        {"matchLabels": {NAMESPACE_NAME_LABEL: settings.operator_namespace}} if settings.operator_namespace else {}
    )
    return [peer]


def _tcp(port: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port}]


def _policy(
    name: str, labels: Mapping[str, str], selector: Mapping[str, str], ingress: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "podSelector": {"matchLabels": dict(selector)},
            "policyTypes": ["Ingress"],
            "ingress": [rule for rule in ingress if rule["from"]],
        },
    }


def build_job_network_policy(job: Mapping[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """The training pods' NetworkPolicy (owned by the DreamBoothJob)."""
    job_name = str(job["metadata"]["name"])
    ranks = {LABEL_JOB_NAME: job_name, LABEL_COMPONENT: Component.TRAINER.value}
    ingress = [
        {"from": [{"podSelector": {"matchLabels": dict(ranks)}}]},
        {
            "from": [*operator_peers(settings), *settings.metrics_ingress_from],
            "ports": _tcp(TRAINER_METRICS_PORT),
        },
    ]
    return adopt(_policy(names.network_policy_name(job_name), child_labels(job), ranks, ingress), job)


def build_inference_network_policy(isvc: Mapping[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """The serving pods' NetworkPolicy (owned by the InferenceService; same name)."""
    name = str(isvc["metadata"]["name"])
    clients = settings.serving_ingress_from if settings.serving_ingress_from is not None else [{"podSelector": {}}]
    ingress = [{"from": [*clients, *settings.metrics_ingress_from], "ports": _tcp(SERVE_PORT)}]
    return adopt(_policy(name, inference_labels(isvc), {LABEL_INFERENCE_NAME: name}, ingress), isvc)

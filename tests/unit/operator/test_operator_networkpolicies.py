"""NetworkPolicies (whole manifests): a DreamBoothJob's pods admit their own gang and, on the metrics port, the
operator; an InferenceService's pods admit their namespace on the serving port. No rule is ever without peers."""

from __future__ import annotations

from typing import Any

import pytest

from dreambooth_operator.builders import build_batch_job
from dreambooth_operator.inference import reconcile_inference
from dreambooth_operator.networkpolicies import build_inference_network_policy, build_job_network_policy
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import T0, make_job

JOB_OWNER = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "DreamBoothJob",
    "name": "cat",
    "uid": "uid-cat",
    "controller": True,
    "blockOwnerDeletion": True,
}
RANKS = {"dreambooth.dev/job-name": "cat", "dreambooth.dev/component": "trainer"}
OPERATOR = {"app.kubernetes.io/name": "dreambooth-operator", "app.kubernetes.io/instance": "dbo"}
OPERATOR_PEER = {
    "podSelector": {"matchLabels": OPERATOR},
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dreambooth-system"}},
}
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
METRICS_PORT = [{"protocol": "TCP", "port": 8080}]


def job_policy(ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": "cat-network",
            "namespace": "team-a",
            "labels": {**RANKS, "app.kubernetes.io/managed-by": "dreambooth-operator"},
            "ownerReferences": [JOB_OWNER],
        },
        "spec": {"podSelector": {"matchLabels": RANKS}, "policyTypes": ["Ingress"], "ingress": ingress},
    }


GANG = {"from": [{"podSelector": {"matchLabels": RANKS}}]}  # every port: rendezvous, NCCL and Gloo

JOB_CASES = [
    (
        "operator-in-its-namespace",
        {"operator_namespace": "dreambooth-system", "operator_pod_labels": OPERATOR},
        [GANG, {"from": [OPERATOR_PEER], "ports": METRICS_PORT}],
    ),
    (
        "operator-namespace-unknown",
        {"operator_pod_labels": OPERATOR},
        [GANG, {"from": [{"podSelector": {"matchLabels": OPERATOR}, "namespaceSelector": {}}], "ports": METRICS_PORT}],
    ),
    (
        "operator-and-prometheus",
        {
            "operator_namespace": "dreambooth-system",
            "operator_pod_labels": OPERATOR,
            "metrics_ingress_from": [PROMETHEUS],
        },
        [GANG, {"from": [OPERATOR_PEER, PROMETHEUS], "ports": METRICS_PORT}],
    ),
    # No operator labels (an operator outside the cluster) and no metrics peers: no metrics rule at all, since a
    # rule without peers would admit everyone.
    ("gang-only", {}, [GANG]),
]


@pytest.mark.parametrize(("case", "settings", "ingress"), JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_job_network_policy(case: str, settings: dict[str, Any], ingress: list[dict[str, Any]]) -> None:
    assert build_job_network_policy(make_job().obj(), OperatorSettings(**settings)) == job_policy(ingress), case


ISVC = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "dog", "namespace": "ns", "uid": "uid-dog", "generation": 1},
    "spec": {"model": {"modelUri": "s3://bkt/m"}},
}
SERVING = {
    "dreambooth.dev/inference-service": "dog",
    "dreambooth.dev/component": "inference",
    "app.kubernetes.io/managed-by": "dreambooth-operator",
}
SERVE_PORT = [{"protocol": "TCP", "port": 8080}]
INGRESS_NS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}

ISVC_CASES = [
    ("namespace-by-default", {}, [{"from": [{"podSelector": {}}], "ports": SERVE_PORT}]),
    (
        "and-prometheus",
        {"metrics_ingress_from": [PROMETHEUS]},
        [{"from": [{"podSelector": {}}, PROMETHEUS], "ports": SERVE_PORT}],
    ),
    ("configured-peers", {"serving_ingress_from": [INGRESS_NS]}, [{"from": [INGRESS_NS], "ports": SERVE_PORT}]),
    ("no-one", {"serving_ingress_from": []}, []),
]


@pytest.mark.parametrize(("case", "settings", "ingress"), ISVC_CASES, ids=[c[0] for c in ISVC_CASES])
def test_inference_network_policy(case: str, settings: dict[str, Any], ingress: list[dict[str, Any]]) -> None:
    assert build_inference_network_policy(ISVC, OperatorSettings(**settings)) == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": "dog",
            "namespace": "ns",
            "labels": SERVING,
            "ownerReferences": [
                {
                    "apiVersion": "dreambooth.dev/v1alpha1",
                    "kind": "InferenceService",
                    "name": "dog",
                    "uid": "uid-dog",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "podSelector": {"matchLabels": {"dreambooth.dev/inference-service": "dog"}},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }, case


def test_the_ports_are_the_pods_ports() -> None:
    settings = OperatorSettings(operator_pod_labels=OPERATOR)
    job = make_job().obj()
    container = build_batch_job(job, 0, settings)["spec"]["template"]["spec"]["containers"][0]
    metrics = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    policy = build_job_network_policy(job, settings)
    assert policy["spec"]["ingress"][1]["ports"] == [{"protocol": "TCP", "port": metrics}]
    plan = reconcile_inference(ISVC, None, None, settings, T0)
    server = plan.children[0]["spec"]["template"]["spec"]["containers"][0]
    assert plan.children[-1]["kind"] == "NetworkPolicy"
    assert plan.children[-1]["spec"]["ingress"][0]["ports"] == [
        {"protocol": "TCP", "port": server["ports"][0]["containerPort"]}
    ]

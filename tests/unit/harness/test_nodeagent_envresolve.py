"""Env, envFrom, fieldRef/resourceFieldRef resolution and $(VAR) expansion of the test node agent."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest

from tests.nodeagent.envresolve import (
    EnvResolutionError,
    RuntimeFields,
    container_argv,
    expand,
    image_entrypoint,
    image_pull_error,
    parse_quantity,
    resolve_env,
)

RUNTIME = RuntimeFields(pod_ip="127.10.0.7", host_ip="127.0.0.1")


class Objects:
    def __init__(self, config_maps: dict[str, Any] | None = None, secrets: dict[str, Any] | None = None) -> None:
        self.config_maps = config_maps or {}
        self.secrets = secrets or {}

    def config_map(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.config_maps.get(f"{namespace}/{name}")

    def secret(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.secrets.get(f"{namespace}/{name}")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


OBJECTS = Objects(
    config_maps={"ns/cfg": {"data": {"greeting": "hello", "mode": "fast", "bad-key!": "x"}}},
    secrets={"ns/creds": {"data": {"token": b64("s3cr3t"), "AWS_ACCESS_KEY_ID": b64("AK")}}},
)

POD: dict[str, Any] = {
    "metadata": {
        "name": "job-0-abc",
        "namespace": "ns",
        "uid": "u-1",
        "labels": {"app": "train"},
        "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
    },
    "spec": {
        "nodeName": "gpu-node-1",
        "serviceAccountName": "default",
        "containers": [{"name": "main", "resources": {"limits": {"cpu": "2", "memory": "1Gi"}}}],
    },
}


def resolve(env: list[dict[str, Any]], env_from: list[dict[str, Any]] | None = None) -> dict[str, str]:
    container = {**POD["spec"]["containers"][0], "env": env, "envFrom": env_from or []}
    return resolve_env(POD, container, OBJECTS, RUNTIME, {"cpu": "16", "memory": "64Gi"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "1"),
        ("x-$(A)-$(B)-y", "x-1-two-y"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$1"),
        ("$(MISSING)", "$(MISSING)"),
        ("$(A", "$(A"),
        ("cost $5", "cost $5"),
        ("end$", "end$"),
        ("$()", "$()"),
        ("no refs", "no refs"),
    ],
)
def test_expand_follows_kubernetes_rules(text: str, expected: str) -> None:
    assert expand(text, {"A": "1", "B": "two"}.get) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "job-0-abc"),
        ("metadata.namespace", "ns"),
        ("metadata.uid", "u-1"),
        ("spec.nodeName", "gpu-node-1"),
        ("spec.serviceAccountName", "default"),
        ("status.podIP", "127.10.0.7"),
        ("status.hostIP", "127.0.0.1"),
        ("metadata.labels['app']", "train"),
        ("metadata.labels['absent']", ""),
        ("metadata.annotations['batch.kubernetes.io/job-completion-index']", "1"),
    ],
)
def test_field_refs(path: str, expected: str) -> None:
    assert resolve([{"name": "V", "valueFrom": {"fieldRef": {"fieldPath": path}}}]) == {"V": expected}


def test_config_map_and_secret_key_refs() -> None:
    env = resolve(
        [
            {"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
            {"name": "T", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        ]
    )
    assert env == {"G": "hello", "T": "s3cr3t"}


@pytest.mark.parametrize(
    ("ref_kind", "ref", "message"),
    [
        ("configMapKeyRef", {"name": "nope", "key": "k"}, 'configmap "nope" not found'),
        ("configMapKeyRef", {"name": "cfg", "key": "nope"}, "couldn't find key nope in Configmap ns/cfg"),
        ("secretKeyRef", {"name": "nope", "key": "k"}, 'secret "nope" not found'),
        ("secretKeyRef", {"name": "creds", "key": "nope"}, "couldn't find key nope in Secret ns/creds"),
    ],
)
def test_missing_refs_fail_unless_optional(ref_kind: str, ref: dict[str, Any], message: str) -> None:
    with pytest.raises(EnvResolutionError, match=message):
        resolve([{"name": "V", "valueFrom": {ref_kind: ref}}])
    assert resolve([{"name": "V", "valueFrom": {ref_kind: {**ref, "optional": True}}}]) == {}


def test_env_from_with_prefix_skips_invalid_names_and_env_overrides_it() -> None:
    env = resolve(
        [{"name": "CFG_mode", "value": "slow"}],
        [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}, {"secretRef": {"name": "creds"}}],
    )
    assert env == {"CFG_greeting": "hello", "CFG_mode": "slow", "token": "s3cr3t", "AWS_ACCESS_KEY_ID": "AK"}


def test_env_from_missing_source() -> None:
    with pytest.raises(EnvResolutionError, match='configmap "gone" not found'):
        resolve([], [{"configMapRef": {"name": "gone"}}])
    assert resolve([], [{"configMapRef": {"name": "gone", "optional": True}}]) == {}


def test_values_expand_only_against_earlier_variables() -> None:
    env = resolve(
        [
            {"name": "A", "value": "a"},
            {"name": "B", "value": "$(A)-$(C)"},
            {"name": "C", "value": "c"},
            {"name": "D", "value": "$(C)$$(A)"},
        ]
    )
    assert env == {"A": "a", "B": "a-$(C)", "C": "c", "D": "c$(A)"}


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ({"resource": "limits.cpu"}, "2"),
        ({"resource": "limits.memory", "divisor": "1Mi"}, "1024"),
        ({"resource": "requests.cpu", "divisor": "1m"}, "2000"),  # requests default to limits
        ({"resource": "limits.ephemeral-storage", "divisor": "1Gi"}, "0"),
        ({"resource": "limits.nvidia.com/gpu"}, "0"),
    ],
)
def test_resource_field_refs(ref: dict[str, str], expected: str) -> None:
    assert resolve([{"name": "R", "valueFrom": {"resourceFieldRef": ref}}]) == {"R": expected}


def test_unset_limit_falls_back_to_node_allocatable() -> None:
    pod = {**POD, "spec": {**POD["spec"], "containers": [{"name": "main"}]}}
    container = {"name": "main", "env": [{"name": "M", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]}
    assert resolve_env(pod, container, OBJECTS, RUNTIME, {"cpu": "16"}) == {"M": "16"}


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", "0.5"), ("2", "2"), ("1Gi", str(2**30)), ("1k", "1000"), ("1.5M", "1500000"), ("1e3", "1000")],
)
def test_parse_quantity(text: str, value: str) -> None:
    assert parse_quantity(text) == Decimal(value)


def test_container_argv_expands_command_and_args() -> None:
    container = {"name": "c", "command": ["run", "$(MODE)"], "args": ["--x=$(X)", "$$(X)", "$(NOPE)"]}
    assert container_argv(container, {"MODE": "fast", "X": "1"}) == ["run", "fast", "--x=1", "$(X)", "$(NOPE)"]


def test_container_without_command_uses_the_configured_entrypoint() -> None:
    container = {"name": "c", "image": "registry.local:5000/trainer:v1", "args": ["run", "$(CFG)"]}
    entrypoints = {"registry.local:5000/trainer": ["dreambooth"]}
    assert container_argv(container, {"CFG": "job.yaml"}, entrypoints) == ["dreambooth", "run", "job.yaml"]
    with pytest.raises(EnvResolutionError, match="no command"):
        container_argv(container, {})


@pytest.mark.parametrize(
    ("image", "found"),
    [("trainer", True), ("trainer:v1", True), ("trainer@sha256:abc", True), ("other:v1", False)],
)
def test_image_entrypoint_matches_without_tag_or_digest(image: str, found: bool) -> None:
    assert bool(image_entrypoint(image, {"trainer": ["dreambooth"]})) is found


def test_images_from_an_invalid_registry_fail_to_pull_and_others_pull() -> None:
    assert image_pull_error("ghcr.io/dreambooth-operator/trainer:0.1.0") is None
    assert image_pull_error("trainer:test") is None
    assert image_pull_error("python") is None
    error = image_pull_error("registry.invalid/team/trainer:typo")
    assert error is not None
    assert "lookup registry.invalid: no such host" in error
    assert image_pull_error("registry.invalid:5000/trainer") is not None

"""InferenceService manifests for the tests against a cluster (integration and e2e).

    apply(cluster, inference_service("cat-server", {"fromJob": "cat"}, scaling={"replicas": 1}), namespace)

No namespace: `kubectl apply -n` sets it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

API_VERSION = "dreambooth.dev/v1alpha1"


def inference_service(name: str, model: Mapping[str, Any], **spec: Any) -> dict[str, Any]:
    """An InferenceService of `model` (`{"fromJob": ...}` or `{"modelUri": ...}`) on the CPU (no GPUs); the other
    spec fields by their API names (`scaling=`, `podTemplate=`, `storage=`, ...)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"model": dict(model), "resources": {"gpus": 0}, **spec},
    }

"""Idempotent API helpers over the official kubernetes client (blocking; the handlers run them in a thread).

One generic request function with explicit content types: creating an object that exists is not an error,
deleting one that is gone is not an error, and custom-resource status goes through the status subresource
with a JSON merge patch (the generated typed clients would send a strategic merge patch, which CRDs reject).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from dreambooth_api.constants import GROUP, INFERENCE_KIND, INFERENCE_PLURAL, JOB_KIND, JOB_PLURAL, VERSION
from dreambooth_operator.layout import FIELD_MANAGER

MERGE_PATCH: Final = "application/merge-patch+json"
APPLY_PATCH: Final = "application/apply-patch+yaml"

# kind -> (API path prefix, plural)
_KINDS: Final = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    (f"{GROUP}/{VERSION}", JOB_KIND): (f"/apis/{GROUP}/{VERSION}", JOB_PLURAL),
    (f"{GROUP}/{VERSION}", INFERENCE_KIND): (f"/apis/{GROUP}/{VERSION}", INFERENCE_PLURAL),
}


def load_api_client(timeout_seconds: int = 60) -> client.ApiClient:
    """In-cluster credentials, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.ApiClient()
    api.configuration.retries = 3
    del timeout_seconds
    return api


def path_of(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = _KINDS[(api_version, kind)]
    base = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base


def request(
    api: client.ApiClient,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = "application/json",
    query: list[tuple[str, str]] | None = None,
    timeout: float = 60.0,
) -> Any:
    """One API request; returns the decoded JSON body."""
    return api.call_api(
        path,
        method,
        query_params=query or [],
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        response_type="object",
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
        _preload_content=True,
        _request_timeout=timeout,
    )


def create(api: client.ApiClient, manifest: Mapping[str, Any]) -> bool:
    """Create the object; False when it already exists."""
    meta = manifest["metadata"]
    path = path_of(manifest["apiVersion"], manifest["kind"], meta["namespace"])
    try:
        request(api, "POST", path, dict(manifest), query=[("fieldManager", FIELD_MANAGER)])
    except ApiException as err:
        if err.status == 409:
            return False
        raise
    return True


def apply(api: client.ApiClient, manifest: Mapping[str, Any], manager: str = FIELD_MANAGER, force: bool = True) -> Any:
    """Server-side apply as `manager`; forced by default: the object ends up as the operator wants the fields it
    owns. Unforced, a field another manager changed since is a conflict (409)."""
    meta = manifest["metadata"]
    path = path_of(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
    query = [("fieldManager", manager)] + ([("force", "true")] if force else [])
    return request(api, "PATCH", path, dict(manifest), content_type=APPLY_PATCH, query=query)


def merge_patch(
    api: client.ApiClient, api_version: str, kind: str, namespace: str, name: str, patch: Mapping[str, Any]
) -> Any:
    return request(api, "PATCH", path_of(api_version, kind, namespace, name), dict(patch), content_type=MERGE_PATCH)


def patch_status(
    api: client.ApiClient, namespace: str, name: str, status: Mapping[str, Any], kind: str = JOB_KIND
) -> Any:
    """Merge-patch a custom resource's status through the status subresource."""
    path = path_of(f"{GROUP}/{VERSION}", kind, namespace, name) + "/status"
    return request(api, "PATCH", path, {"status": dict(status)}, content_type=MERGE_PATCH)


def delete(
    api: client.ApiClient,
    api_version: str,
    kind: str,
    namespace: str,
    name: str,
    propagation: str = "Background",
    *,
    grace_period_seconds: int | None = None,
    uid: str | None = None,
) -> bool:
    """Delete the object; False when it is already gone (or, with `uid`, replaced by another object).

    `grace_period_seconds=0` force-deletes; `uid` is a precondition, so a same-named successor is never deleted.
    """
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
    if grace_period_seconds is not None:
        body["gracePeriodSeconds"] = grace_period_seconds
    if uid:
        body["preconditions"] = {"uid": uid}
    try:
        request(api, "DELETE", path_of(api_version, kind, namespace, name), body)
    except ApiException as err:
        if err.status == 404 or (uid and err.status == 409):
            return False
        raise
    return True


def get(api: client.ApiClient, api_version: str, kind: str, namespace: str, name: str) -> Any:
    """The object, or None when it does not exist."""
    try:
        return request(api, "GET", path_of(api_version, kind, namespace, name))
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def list_labelled(api: client.ApiClient, api_version: str, kind: str, namespace: str, selector: str) -> list[Any]:
    """The objects of a kind in the namespace that match a label selector."""
    result = request(api, "GET", path_of(api_version, kind, namespace), query=[("labelSelector", selector)])
    return list(result.get("items") or [])


def merge_diff(
    old: Mapping[str, Any] | None, new: Mapping[str, Any], keep: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) that turns `old` into `new`: changed keys, nested maps diffed, and null
    for dropped keys (except those in `keep`, which other writers own, such as kopf's bookkeeping)."""
    old = old or {}
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_diff(before, value)
            if nested:
                patch[key] = nested
        elif before != value:
            patch[key] = value
    for key in old:
        if key not in new and key not in keep:
            patch[key] = None
    return patch

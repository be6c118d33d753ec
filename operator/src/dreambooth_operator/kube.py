"""Idempotent API helpers over the official kubernetes client (blocking; the handlers run them in a thread).

One generic request function with explicit content types: creating an object that exists is not an error,
deleting one that is gone is not an error, and custom-resource status goes through the status subresource
with a JSON merge patch (the generated typed clients would send a strategic merge patch, which CRDs reject).

Children are never clobbered (`ensure_child`, `delete_owned`): one is created only where none exists (a POST, which
fails on an existing object), and updated (server-side apply) or deleted only when the owner's uid is its
controller ownerReference, with the child's own uid in the request, so that a same-named successor is never touched.

A child is created by one server-side apply that cannot touch an existing object (`create_by_apply`: with a
resourceVersion no existing child can have, which the API server checks against an existing object and ignores
when it creates one), so no read comes first: only when the name is taken is the object read and its controller
checked. (A POST would need a second request: it records the fields under an Update entry, which a later unforced
apply of a changed field conflicts with.)
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.util.retry import Retry

from dreambooth_api.constants import GROUP, INFERENCE_KIND, INFERENCE_PLURAL, JOB_KIND, JOB_PLURAL, VERSION
from dreambooth_operator import ownership
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
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    (f"{GROUP}/{VERSION}", JOB_KIND): (f"/apis/{GROUP}/{VERSION}", JOB_PLURAL),
    (f"{GROUP}/{VERSION}", INFERENCE_KIND): (f"/apis/{GROUP}/{VERSION}", INFERENCE_PLURAL),
}


# Answers worth another try of a request that is safe to repeat: throttled, or the API server (or a load balancer
# in front of it) briefly unavailable.
RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})


class OperatorApiClient(client.ApiClient):  # type: ignore[misc]  # the kubernetes client is untyped
    """An ApiClient whose requests time out after `request_timeout` seconds unless a call names its own timeout
    (the generated client has no default: a request to an API server that stopped answering would hang)."""

    def __init__(self, configuration: client.Configuration, request_timeout: float) -> None:
        super().__init__(configuration)
        self.request_timeout = request_timeout

    def request(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self.request_timeout
        return super().request(*args, **kwargs)


def retry_policy(retries: int) -> Retry:
    """urllib3's retries for every API request: connection errors (the request never reached the server) for any
    method; read errors and 429/5xx answers only for methods that are safe to repeat (GET, HEAD, PUT, DELETE,
    OPTIONS, TRACE: urllib3's default), never a POST or PATCH that may have been applied. Retry-After is obeyed."""
    return Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=0.5,
        status_forcelist=RETRY_STATUSES,
        raise_on_status=False,
    )


def load_api_client(timeout_seconds: float = 60, retries: int = 3, connections: int | None = None) -> OperatorApiClient:
    """In-cluster credentials, else the kubeconfig ($KUBECONFIG or ~/.kube/config); with retries, a request
    timeout and at most `connections` kept-alive connections to the API server (None: the client's default, 5 per
    CPU). All are set on the Configuration before the ApiClient exists: its connection pool reads them once, when
    it is built."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    configuration.retries = retry_policy(retries)
    if connections is not None:
        configuration.connection_pool_maxsize = connections
    return OperatorApiClient(configuration, timeout_seconds)


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
    timeout: float | None = None,
) -> Any:
    """One API request; returns the decoded JSON body. `timeout` None: the client's request timeout."""
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


CREATE_ONLY_VERSION: Final = "1"
"""The resourceVersion that makes a server-side apply create-only (`create_by_apply`). An apply that names a
resourceVersion changes only an object of that version (any other answers 409 Conflict, and nothing is written);
an absent object is created whatever the version (kube-apiserver 1.36; tests/integration/test_operator_kube.py).
No object has version 1: etcd's first write is revision 2, and a child is written long after its namespace."""


def create_by_apply(api: client.ApiClient, manifest: Mapping[str, Any]) -> Any:
    """Create the object by a server-side apply as the operator's field manager (which then owns every field it
    set, as its later applies expect); None, with nothing written, when an object of that name exists."""
    # Only the metadata changes: a shallow copy of it (a deep copy of the whole manifest was work on the burst path).
    body = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": CREATE_ONLY_VERSION}}
    try:
        return apply(api, body)
    except ApiException as err:
        if err.status == 409:  # the version differs (or a field conflicts): an object of the name exists
            return None
        raise


def apply(api: client.ApiClient, manifest: Mapping[str, Any], manager: str = FIELD_MANAGER, force: bool = False) -> Any:
    """Server-side apply as `manager`. Unforced, a field that another manager set is a conflict (409); forced,
    the apply takes the field over. (Children go through `ensure_child`, which checks their controller first.)"""
    meta = manifest["metadata"]
    path = path_of(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
    query = [("fieldManager", manager)] + ([("force", "true")] if force else [])
    return request(api, "PATCH", path, dict(manifest), content_type=APPLY_PATCH, query=query)


class ForeignChildError(Exception):
    """A child's name is taken by an object its owner does not control (`found`, as read)."""

    def __init__(self, conflict: ownership.Foreign, found: Mapping[str, Any] | None = None) -> None:
        super().__init__(conflict.message)
        self.conflict = conflict
        self.found = found


class FieldConflictError(Exception):
    """An owned child's field was set by another field manager; the operator does not overwrite it."""

    def __init__(self, kind: str, name: str, managers: set[str], fields: list[str]) -> None:
        super().__init__(
            f"{', '.join(sorted(fields)) or 'a field'} of the {kind} {name} was changed by "
            f"{', '.join(sorted(managers))}; the operator does not overwrite it: undo the change or delete the {kind}"
        )
        self.kind, self.name, self.managers, self.fields = kind, name, managers, fields


_CONFLICT_MANAGER = re.compile(r'conflict with "([^"]+)"')


def conflicting_managers(err: ApiException) -> tuple[set[str], list[str]]:
    """(field managers, fields) named by a server-side apply conflict (409 with FieldManagerConflict causes)."""
    try:
        causes = ((json.loads(err.body or "{}") or {}).get("details") or {}).get("causes") or []
    except ValueError:
        return set(), []
    managers, fields = set(), []
    for cause in causes:
        if cause.get("reason") != "FieldManagerConflict":
            continue
        match = _CONFLICT_MANAGER.search(str(cause.get("message") or ""))
        if match:
            managers.add(match.group(1))
        fields.append(str(cause.get("field") or ""))
    return managers, fields


def apply_owned(api: client.ApiClient, manifest: Mapping[str, Any], uid: str, *, force: bool = False) -> Any:
    """Server-side apply to the object with this uid only: with `metadata.uid` in the body the API server refuses
    (409 when none exists, 422 when another object has the name) instead of creating or changing another object.

    Unforced, a conflict with the operator's own earlier write (the create, recorded as an Update by the same
    manager) is resolved by applying again with force; a conflict with any other manager raises FieldConflictError.
    """
    body = copy.deepcopy(dict(manifest))
    body["metadata"]["uid"] = uid
    try:
        return apply(api, body, force=force)
    except ApiException as err:
        if err.status != 409 or force:
            raise
        managers, fields = conflicting_managers(err)
        if not managers:
            raise
        if managers - {FIELD_MANAGER}:
            meta = body["metadata"]
            raise FieldConflictError(body["kind"], meta["name"], managers - {FIELD_MANAGER}, fields) from err
        return apply(api, body, force=True)


def ensure_child(
    api: client.ApiClient,
    manifest: Mapping[str, Any],
    owner: Mapping[str, Any],
    *,
    force: bool = False,
    read_first: bool = False,
) -> Any:
    """Create the child where none exists, else update it if `owner` controls it; raise ForeignChildError when
    another object has its name. `force`: take fields over from other managers (the serving Deployment's
    spec.replicas from the HorizontalPodAutoscaler's controller: inference_builders.py).

    The create comes first (`create_by_apply`, which fails on an existing object), and only a name that is taken is
    read: a new child costs one request. `read_first`, for a child that usually exists (applied at every
    reconcile): read it first, and create it only where none exists.
    """
    meta = manifest["metadata"]
    api_version, kind, namespace, name = manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"]
    existing = get(api, api_version, kind, namespace, name) if read_first else None
    if existing is None:
        created = create_by_apply(api, manifest)
        if created is not None:
            return created
        existing = get(api, api_version, kind, namespace, name)
    if existing is None:
        raise ApiException(status=409, reason=f"the {kind} {name} was created and deleted meanwhile")
    conflict = ownership.foreign(kind, existing, owner)
    if conflict is not None:
        raise ForeignChildError(conflict, existing)
    return apply_owned(api, manifest, str(existing["metadata"]["uid"]), force=force)


def delete_owned(
    api: client.ApiClient, api_version: str, kind: str, namespace: str, name: str, owner_uid: str, **options: Any
) -> bool:
    """Delete the child if `owner_uid` controls it (with its uid as precondition); False when it is gone or not
    the owner's (a foreign object is never deleted)."""
    existing = get(api, api_version, kind, namespace, name)
    if existing is None or not ownership.controlled_by(existing, owner_uid):
        return False
    return delete(api, api_version, kind, namespace, name, uid=str(existing["metadata"]["uid"]), **options)


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

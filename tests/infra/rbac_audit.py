"""RBAC permissions as (verb, apiGroup, resource[/subresource]) triples: those a user really used, read from the
kube-apiserver's JSON audit log, and those RBAC rules grant (tests/e2e/test_rbac_audit.py compares them)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

CHART_NAME = "dreambooth-operator"
HARNESS_RELEASE_PREFIX = "op-"
"""tests/infra/operator.py installs the chart's RBAC as release `op-<namespace>` (at most 53 characters)."""


class Permission(NamedTuple):
    verb: str
    group: str
    resource: str
    """`resource` or `resource/subresource`."""

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}.{self.group or 'core'}"


def chart_fullname(release: str) -> str:
    """The chart's `dbo.fullname` (its ServiceAccount's name): `<release>-dreambooth-operator`, at most 63."""
    name = release if CHART_NAME in release else f"{release}-{CHART_NAME}"
    return name[:63].removesuffix("-")


def is_operator_user(username: str) -> bool:
    """True for the chart's operator ServiceAccount: the harness's release in its home namespace (a long namespace
    truncates the name), or any release whose full name is whole (a `helm install`)."""
    prefix, _, rest = username.partition("system:serviceaccount:")
    namespace, _, name = rest.partition(":")
    if prefix or not namespace or not name:
        return False
    return name == chart_fullname(f"{HARNESS_RELEASE_PREFIX}{namespace}"[:53]) or name.endswith(CHART_NAME)


def used_permissions(lines: Iterable[str], user: Callable[[str], bool] = is_operator_user) -> set[Permission]:
    """The resource requests of the users `user` accepts, in audit events (JSON lines); non-resource URLs
    (discovery, /version) are not RBAC resource rules and are left out."""
    used: set[Permission] = set()
    for line in lines:
        if not line.strip():
            continue
        event = json.loads(line)
        ref = event.get("objectRef")
        if not ref or not user(event.get("user", {}).get("username", "")):
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        used.add(Permission(event["verb"], ref.get("apiGroup", ""), resource))
        if event["verb"] == "patch" and (event.get("responseStatus") or {}).get("code") == 201:
            # A server-side apply that created the object (201): the API server authorizes it as a create too, and
            # the audit log records only the patch (the operator creates its children this way).
            used.add(Permission("create", ref.get("apiGroup", ""), resource))
    return used


def granted_permissions(objects: Iterable[Mapping[str, Any]], service_account: str) -> set[Permission]:
    """Every (verb, group, resource) that the Roles and ClusterRoles bound to `service_account` among `objects` (a
    rendered chart) grant; other accounts' roles (a hook's) do not count. No wildcards expected."""
    docs = list(objects)
    bound = {
        (binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for binding in docs
        if binding.get("kind") in ("RoleBinding", "ClusterRoleBinding")
        and any(s["kind"] == "ServiceAccount" and s["name"] == service_account for s in binding.get("subjects") or ())
    }
    granted: set[Permission] = set()
    for role in docs:
        if (role.get("kind"), role.get("metadata", {}).get("name")) not in bound:
            continue
        for rule in role.get("rules") or ():
            for verb in rule["verbs"]:
                for group in rule["apiGroups"]:
                    granted.update(Permission(verb, group, resource) for resource in rule["resources"])
    return granted

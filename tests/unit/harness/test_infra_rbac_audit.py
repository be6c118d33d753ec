"""The audit-log and RBAC-rule readers behind tests/e2e/test_rbac_audit.py, on hand-written documents."""

from __future__ import annotations

import json
from typing import Any

from tests.infra.rbac_audit import Permission, chart_fullname, granted_permissions, is_operator_user, used_permissions

OPERATOR = "system:serviceaccount:team-a:op-team-a-dreambooth-operator"


def _event(user: str, verb: str, resource: str, group: str = "", subresource: str = "") -> str:
    ref: dict[str, Any] = {"resource": resource, "apiGroup": group, "namespace": "team-a"}
    if subresource:
        ref["subresource"] = subresource
    return json.dumps({"user": {"username": user}, "verb": verb, "objectRef": ref})


def test_chart_fullname_is_truncated_as_helm_does() -> None:
    assert chart_fullname("op") == "op-dreambooth-operator"
    assert chart_fullname("dreambooth-operator") == "dreambooth-operator"
    long = "op-" + "t-test-captions-evaluation-and-a-failed-qu-7d0de027"
    assert chart_fullname(long[:53]) == "op-t-test-captions-evaluation-and-a-failed-qu-7d0de02-dreamboot"


def test_operator_users_are_the_charts_service_accounts_only() -> None:
    assert is_operator_user(OPERATOR)
    ns = "t-test-captions-evaluation-and-a-failed-qu-7d0de027"
    assert is_operator_user(f"system:serviceaccount:{ns}:{chart_fullname(f'op-{ns}'[:53])}")
    assert is_operator_user("system:serviceaccount:dreambooth-system:dreambooth-operator")
    assert not is_operator_user("system:serviceaccount:dreambooth-system:dreambooth-operator-uninstall")
    assert not is_operator_user("system:serviceaccount:team-a:default")
    assert not is_operator_user("dbo-admin")


def test_used_permissions_keep_subresources_and_skip_other_users_and_urls() -> None:
    lines = [
        _event(OPERATOR, "patch", "dreamboothjobs", "dreambooth.dev", "status"),
        _event(OPERATOR, "watch", "pods"),
        _event("system:serviceaccount:team-a:default", "delete", "pods"),
        json.dumps({"user": {"username": OPERATOR}, "verb": "get", "requestURI": "/version"}),
        "",
    ]
    assert used_permissions(lines) == {
        Permission("patch", "dreambooth.dev", "dreamboothjobs/status"),
        Permission("watch", "", "pods"),
    }


def test_granted_permissions_come_from_roles_bound_to_the_account() -> None:
    def binding(kind: str, role_kind: str, name: str, account: str) -> dict[str, Any]:
        subject = {"kind": "ServiceAccount", "name": account, "namespace": "ops"}
        return {"kind": kind, "roleRef": {"kind": role_kind, "name": name}, "subjects": [subject]}

    rule = {"apiGroups": ["", "apps"], "resources": ["pods", "deployments/scale"], "verbs": ["list"]}
    docs = [
        {"kind": "Role", "metadata": {"name": "ours"}, "rules": [rule]},
        {"kind": "ClusterRole", "metadata": {"name": "cluster"}, "rules": [{**rule, "apiGroups": ["batch"]}]},
        {"kind": "Role", "metadata": {"name": "hook"}, "rules": [{**rule, "verbs": ["patch"]}]},
        binding("RoleBinding", "Role", "ours", "op"),
        binding("RoleBinding", "ClusterRole", "cluster", "op"),
        binding("RoleBinding", "Role", "hook", "op-uninstall"),
    ]
    granted = granted_permissions(docs, "op")
    assert granted == {
        Permission("list", group, resource)
        for group in ("", "apps", "batch")
        for resource in ("pods", "deployments/scale")
    }


def test_an_apply_that_created_the_object_counts_as_a_create_too() -> None:
    """The API server authorizes a server-side apply that creates an object as a create as well (patch.go's
    create authorizer attributes), but the audit log records only the patch; its response code tells them apart."""
    created = json.loads(_event(OPERATOR, "patch", "configmaps"))
    created["responseStatus"] = {"code": 201}
    updated = json.loads(_event(OPERATOR, "patch", "services"))
    updated["responseStatus"] = {"code": 200}
    refused = json.loads(_event(OPERATOR, "patch", "deployments", "apps"))
    refused["responseStatus"] = {"code": 409}
    assert used_permissions([json.dumps(e) for e in (created, updated, refused)]) == {
        Permission("patch", "", "configmaps"),
        Permission("create", "", "configmaps"),
        Permission("patch", "", "services"),
        Permission("patch", "apps", "deployments"),
    }

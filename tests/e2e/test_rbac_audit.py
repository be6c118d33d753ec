"""The chart's RBAC against what the operator really did: the API server's audit log of the whole test session
(every operator in it runs as the chart's ServiceAccount with the chart's rendered RBAC, tests/infra/operator.py)
compared with the rules of `helm template`, both ways. tests/e2e/conftest.py orders this test last."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.infra.controlplane import Cluster
from tests.infra.paths import ROOT
from tests.infra.processes import tool
from tests.infra.rbac_audit import Permission, chart_fullname, granted_permissions, used_permissions
from tests.infra.reliability import record

CHART = ROOT / "charts" / "dreambooth-operator"
E2E = Path(__file__).parent

# What every authenticated user may do (the bootstrap ClusterRole system:basic-user), not the chart's to grant: the
# Kubernetes client asks who it is.
EVERYONE = {Permission("create", "authentication.k8s.io", "selfsubjectreviews")}
# Grants that the run cannot show being used, each with its reason and the test of the code that needs it.
NOT_EXERCISED: dict[Permission, str] = (
    {
        Permission("update", "dreambooth.dev", f"{plural}/finalizers"): (
            "children's ownerReferences carry blockOwnerDeletion, which the admission plugin "
            "OwnerReferencesPermissionEnforcement (on where a cluster enables it) authorizes against the owner's "
            "finalizers: an authorization check, never a request of the operator's own (test_operator_builders)"
        )
        for plural in ("dreamboothjobs", "inferenceservices")
    }
    | {
        Permission(verb, "kopf.dev", "clusterkopfpeerings"): (
            "the peering of a cluster-wide install (kopf's, the same code as the namespaced KopfPeering that the run "
            "uses); every operator of the run watches its own namespaces. test_chart.py::test_rbac_is_least_privilege "
            "checks the grant"
        )
        for verb in ("list", "watch", "patch")
    }
    | {
        Permission("delete", "", "pods"): (
            "force-deleting a job's pods stuck Terminating on a lost node (reason StuckPodsForceDeleted): no e2e "
            "loses a node; tests/unit/operator/test_operator_policy_lost_pods.py"
        )
    }
)


def _rendered_rules(*sets: str) -> set[Permission]:
    result = subprocess.run(
        [
            str(tool("helm")),
            "template",
            "op",
            str(CHART),
            "--namespace",
            "ops",
            "--set=rbac.aggregatedRoles=false",
            *sets,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return granted_permissions((d for d in yaml.safe_load_all(result.stdout) if d), chart_fullname("op"))


def _whole_e2e_run(session: pytest.Session) -> bool:
    """Every e2e test module ran in this session (a partial run cannot show that a grant is unused)."""
    ran = {item.path.name for item in session.items}
    return all(path.name in ran for path in E2E.glob("test_*.py"))


def test_operator_uses_exactly_what_the_chart_grants(cluster: Cluster, request: pytest.FixtureRequest) -> None:
    assert cluster.audit_log is not None
    with cluster.audit_log.open() as log:
        lines = log.readlines()
    # A 403 is not a finding by itself: the operator may start before the RBAC objects just applied reach the
    # authorizer's cache, and retries. What it asked for is what counts.
    used = used_permissions(lines) - EVERYONE
    if not used:
        pytest.skip("no operator ran in this session")
    # Both installs: watched namespaces (Roles, the harness) and cluster-wide (ClusterRole, the chart's default).
    granted = _rendered_rules("--set=watchNamespaces={a}") | _rendered_rules()
    record(
        "rbac",
        used=sorted(map(str, used)),
        granted=sorted(map(str, granted)),
        unused=sorted(map(str, granted - used)),
    )
    assert sorted(map(str, used - granted)) == []
    if not _whole_e2e_run(request.session):
        pytest.skip("not the whole e2e run: unused grants are only checked after every e2e module")
    unused: dict[str, str] = {str(p): NOT_EXERCISED.get(p, "never used") for p in granted - used}
    assert {p: why for p, why in unused.items() if why == "never used"} == {}
    assert sorted(map(str, set(NOT_EXERCISED) - granted)) == []  # an exemption for a grant that is gone
    assert sorted(map(str, set(NOT_EXERCISED) & used)) == []  # an exemption for a grant the run does use

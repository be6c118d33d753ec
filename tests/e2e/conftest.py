"""e2e tier: tests whose pods really run, as processes started by the test node agent.

The ``node_agent`` fixture comes from ``tests/nodeagent/plugin.py`` (loaded by the root conftest); ``cluster``
and ``namespace`` come from ``tests/infra/fixtures.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, running_operator

RUNS_LAST = "test_rbac_audit.py"  # it reads the audit log of everything the session's operators did


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the RBAC audit comparison to the end of the session (after the integration tests too)."""
    items.sort(key=lambda item: item.path.name == RUNS_LAST)  # stable: the others keep their order


@pytest.fixture
def op(cluster: Cluster, namespace: str, infra_log_dir: Path, node_agent: Any) -> Iterator[OperatorProcess]:
    """The operator as a real subprocess watching this test's namespace, with the node agent running pods. It runs
    as the Helm chart's ServiceAccount with the chart's rendered RBAC, and the namespace enforces Pod Security
    "restricted" (operator_harness.py)."""
    with running_operator(cluster, infra_log_dir, [namespace]) as operator:
        yield operator

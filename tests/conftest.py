"""Root conftest: every test gets its tier marker from the folder it lives in; shared fixtures are plugins.

`tests/infra/fixtures.py` provides the servers (`cluster`, `namespace`, `s3`, `s3_env`, `prometheus`,
`promtool`, `infra_log_dir`); `tests/nodeagent/plugin.py` (when present) provides `node_agent`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The plugins are imported as `tests.<...>`: make the repository root importable however pytest is invoked.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TIERS = ("unit", "integration", "e2e", "gpu")

pytest_plugins = ["tests.infra.fixtures"]
if (ROOT / "tests" / "nodeagent" / "plugin.py").exists():
    pytest_plugins.append("tests.nodeagent.plugin")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        parts = Path(item.fspath).relative_to(root).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))

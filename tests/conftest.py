"""Root conftest: every test gets its tier marker from the folder it lives in; shared fixtures are plugins.

`tests/infra/fixtures.py` provides the servers (`cluster`, `namespace`, `s3`, `s3_env`, `prometheus`,
`promtool`, `infra_log_dir`); `tests/nodeagent/plugin.py` (when present) provides `node_agent`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The plugins are imported as `tests.<...>`: make the repository root importable however pytest is invoked.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# On a 2-core CI machine, torch's intra-op threads spin against each other and against the servers the tests
# start: one thread per process is several times faster here. Set before torch is first imported, and inherited by
# every trainer process a test starts. A test or a pod spec that sets it explicitly wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

TIERS = ("unit", "integration", "e2e", "gpu")

pytest_plugins = ["tests.infra.fixtures"]
pytest_plugins.append("tests.nodeagent.plugin")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread in this process too (OMP_NUM_THREADS may have been set otherwise), for test
    modules that use torch; the operator's tests never import it."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        parts = Path(item.fspath).relative_to(root).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))

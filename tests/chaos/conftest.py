"""The chaos suite (issue 17): one short job per scenario on the tiny model, faults drawn from a fixed seed.

Each test draws its faults (which step, which moment) from `chaos_rng`, seeded with a fixed number per test;
`DBO_CHAOS_SEED` overrides it, and a failing test's report shows the seed to rerun it with. The tests carry the
`e2e` marker (pods really run, through the node agent), so `make test` runs them, and `chaos` (`-m chaos` alone).
The storage-fault scenarios of the chaos list are integration tests: tests/integration/test_trainer_storage_faults.py.
"""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, running_operator

SEED_ENV = "DBO_CHAOS_SEED"
_SEED = pytest.StashKey[int]()


@pytest.fixture
def chaos_rng(request: pytest.FixtureRequest) -> random.Random:
    """The test's random source: DBO_CHAOS_SEED, or a fixed seed of its own (the crc32 of its name)."""
    configured = os.environ.get(SEED_ENV)
    seed = int(configured) if configured else zlib.crc32(request.node.name.encode()) % 100_000
    request.node.stash[_SEED] = seed
    print(f"chaos seed {seed} ({SEED_ENV}={seed} reruns these faults)")
    return random.Random(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing chaos test's report names its seed."""
    report: pytest.TestReport = yield
    seed = item.stash.get(_SEED, None)
    if report.failed and seed is not None:
        report.sections.append(("chaos seed", f"{seed}: rerun with {SEED_ENV}={seed}"))
    return report


@pytest.fixture
def op(cluster: Cluster, namespace: str, infra_log_dir: Path, node_agent: Any) -> Iterator[OperatorProcess]:
    """The operator as in the e2e tests (tests/e2e/conftest.py): the chart's ServiceAccount and RBAC, this test's
    namespace (Pod Security "restricted"), the node agent running the pods."""
    with running_operator(cluster, infra_log_dir, [namespace]) as operator:
        yield operator

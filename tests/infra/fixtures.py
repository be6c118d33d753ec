"""pytest plugin: real servers on loopback as fixtures (loaded from tests/conftest.py via `pytest_plugins`).

Fixtures (all servers live for the whole session and are stopped at its end):

- `cluster` -> `tests.infra.controlplane.Cluster`: etcd + kube-apiserver (RBAC, static tokens) +
  kube-controller-manager + kube-scheduler. `cluster.kubeconfig` / `cluster.restricted_kubeconfig`,
  `cluster.kubectl(...)`, `cluster.api_client()`. No nodes: the node agent fixture adds them.
- `namespace` -> str: a fresh namespace (with its `default` ServiceAccount), deleted after the test.
- `s3` -> `tests.infra.s3.S3Server`: SeaweedFS S3 with `endpoint`, `access_key`, `secret_key`, `region`,
  `client()`, `make_bucket()`. `s3_env` -> dict of AWS_* variables for subprocesses.
- `prometheus` -> factory `(scrape_configs=..., rule_files=..., targets=..., job=...) -> PrometheusServer`.
- `promtool` -> Path of the promtool binary.
- `infra_log_dir` -> Path where every server logs (`<name>.log`); kept (and printed) when a test fails.
- `infra_work_dir` -> Path for server data (etcd, SeaweedFS, Prometheus TSDB, PKI, kubeconfigs).

When the collected tests need `cluster` or `s3`, etcd and SeaweedFS are launched as soon as collection ends
(without waiting), so they come up in parallel with everything else. When a test fails, the report gets the
log tail of every server that is running (sections "log tail: <name>").
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.infra.controlplane import STARTUP_TIMEOUT_S, Cluster, start_cluster
from tests.infra.etcd import Etcd, start_etcd
from tests.infra.processes import REGISTRY, ManagedProcess, stop_all, tail
from tests.infra.prometheus import PrometheusServer, promtool_path, start_prometheus, static_scrape_config
from tests.infra.s3 import S3Server, start_s3

LOG_DIR_ENV = "DBO_TEST_LOG_DIR"
REPORT_TAIL_LINES = 30


class _InfraState:
    """Session-wide state of the plugin: directories, servers started early, failures seen."""

    def __init__(self) -> None:
        self.log_dir: Path | None = None
        self.work_dir: Path | None = None
        self.keep_logs = False
        self.failed = False
        self.etcd: Etcd | None = None
        self.s3: S3Server | None = None

    def ensure_dirs(self) -> tuple[Path, Path]:
        if self.log_dir is None:
            configured = os.environ.get(LOG_DIR_ENV)
            if configured:
                self.log_dir = Path(configured)
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self.keep_logs = True
            else:
                self.log_dir = Path(tempfile.mkdtemp(prefix="dbo-test-logs-"))
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="dbo-test-infra-"))
        return self.log_dir, self.work_dir

    def cluster_dir(self) -> Path:
        return self.ensure_dirs()[1] / "cluster"

    def start_etcd_early(self) -> None:
        if self.etcd is None:
            self.etcd = start_etcd(self.cluster_dir() / "etcd", self.ensure_dirs()[0])

    def start_s3_early(self) -> S3Server:
        if self.s3 is None:
            log_dir, work_dir = self.ensure_dirs()
            self.s3 = start_s3(work_dir / "s3", log_dir)
        return self.s3


_STATE = _InfraState()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Launch the slow-to-start servers the collected tests need (etcd, SeaweedFS) without waiting for them.

    They come up while other fixtures start; the `cluster` and `s3` fixtures then only wait for readiness.
    """
    if session.config.option.collectonly:
        return
    needed: set[str] = set()
    for item in session.items:
        needed.update(getattr(item, "fixturenames", ()))
    if "s3" in needed:
        _STATE.start_s3_early()
    if "cluster" in needed:
        _STATE.start_etcd_early()


_TEST_START = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_TEST_START] = time.time()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach log tails to the report and keep the log dir.

    Attached: every server still running (started with `start_process`), and every other `*.log` in
    `infra_log_dir` written to since the test began (e.g. the node agent's or the operator's log).
    """
    report: pytest.TestReport = yield
    if report.failed:
        _STATE.failed = True
        shown: set[Path] = set()
        for proc in REGISTRY.all():
            shown.add(proc.log_path)
            report.sections.append((f"log tail: {proc.name} ({proc.log_path})", proc.log_tail(REPORT_TAIL_LINES)))
        if _STATE.log_dir is not None:
            since = item.stash.get(_TEST_START, 0.0) - 1.0
            for path in sorted(_STATE.log_dir.glob("*.log")):
                if path not in shown and path.stat().st_mtime >= since:
                    report.sections.append((f"log tail: {path.stem} ({path})", tail(path, REPORT_TAIL_LINES)))
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int) -> None:
    if _STATE.log_dir is not None and (_STATE.failed or exitstatus != 0 or _STATE.keep_logs):
        terminalreporter.write_line(f"test server logs kept in {_STATE.log_dir}")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Clean up: stop anything still running; remove the logs unless something failed."""
    stop_all(REGISTRY.all())
    if _STATE.work_dir is not None:
        shutil.rmtree(_STATE.work_dir, ignore_errors=True)
    if _STATE.log_dir is not None and not (_STATE.failed or _STATE.keep_logs):
        shutil.rmtree(_STATE.log_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def infra_log_dir() -> Path:
    """Directory where the test servers log (`<name>.log`); kept when a test fails (path printed at the end)."""
    return _STATE.ensure_dirs()[0]


@pytest.fixture(scope="session")
def infra_work_dir() -> Path:
    """Scratch directory for server data; removed at the end of the session."""
    return _STATE.ensure_dirs()[1]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The test control plane (see `tests.infra.controlplane.Cluster`), shared by the whole session."""
    _STATE.start_etcd_early()
    procs: list[ManagedProcess] = []
    try:
        yield start_cluster(_STATE.cluster_dir(), _STATE.ensure_dirs()[0], procs, STARTUP_TIMEOUT_S, etcd=_STATE.etcd)
    finally:
        stop_all(procs)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (unique name, `default` ServiceAccount present), deleted (without waiting) afterwards."""
    prefix = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = cluster.create_namespace(prefix.rstrip("-"))
    yield name
    cluster.delete_namespace(name, wait=False)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A SeaweedFS S3 server shared by the session; use `s3.make_bucket()` for a bucket of your own."""
    server = _STATE.start_s3_early()
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_env(s3: S3Server) -> dict[str, str]:
    """AWS_* variables plus the endpoint (AWS_ENDPOINT_URL, S3_ENDPOINT_URL) for subprocesses."""
    return s3.env()


@pytest.fixture
def aws_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's credentials for `s3` come from the environment, as in a pod (secretKeyRef); no instance
    metadata lookups."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


PrometheusFactory = Callable[..., PrometheusServer]


@pytest.fixture(scope="session")
def prometheus(infra_log_dir: Path, infra_work_dir: Path) -> Iterator[PrometheusFactory]:
    """Factory that starts a Prometheus; every one is stopped at the end of the session.

    Call it as `prometheus(targets=["127.0.0.1:8000"], job="app", rule_files=[path])` or with full
    `scrape_configs=[...]`; `scrape_interval`/`evaluation_interval` default to "1s".
    """
    started: list[PrometheusServer] = []

    def start(
        *,
        targets: Sequence[str] = (),
        job: str = "test",
        scrape_configs: Sequence[Mapping[str, Any]] = (),
        rule_files: Sequence[Path] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
    ) -> PrometheusServer:
        configs = list(scrape_configs)
        if targets:
            configs.append(static_scrape_config(job, targets))
        index = len(started)
        server = start_prometheus(
            infra_work_dir / f"prometheus-{index}",
            infra_log_dir,
            scrape_configs=configs,
            rule_files=rule_files,
            scrape_interval=scrape_interval,
            evaluation_interval=evaluation_interval,
            name=f"prometheus-{index}",
        )
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture(scope="session")
def promtool() -> Path:
    """Path of the pinned promtool binary (see also `tests.infra.prometheus.run_promtool`)."""
    return promtool_path()

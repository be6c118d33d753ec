"""The ``node_agent`` pytest fixture: fake GPU nodes whose pods run as local processes.

Load it with ``pytest_plugins = ["tests.nodeagent.plugin"]`` in the top-level conftest (or import the fixtures
into a conftest). It needs the ``cluster`` fixture (tests/infra/fixtures.py). Override ``node_agent_settings``
(a session fixture returning a dict of ``AgentConfig`` fields) to change nodes, capacity, env or entrypoints.

The agent is a child process (see ``agent.py`` for why); this handle starts it, waits until its nodes are
registered and Ready, reads pod logs from its state folder, and stops it (SIGTERM: pods get SIGTERM, are
reported Failed with a ``DisruptionTarget`` condition, nodes and the ``/etc/hosts`` block are removed).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.paths import ROOT

from . import layout
from .config import AgentConfig
from .runtime import read_log

REPO_ROOT = ROOT
START_TIMEOUT_S = 90.0


class NodeAgentError(RuntimeError):
    """The agent did not start, or died."""


class NodeAgent:
    """A running node agent process."""

    def __init__(self, config: AgentConfig, log_file: Path) -> None:
        self.config = config
        self.log_file = log_file
        self.state_dir = config.state_path
        self.info: dict[str, Any] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def nodes(self) -> list[str]:
        return list(self.config.nodes)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = START_TIMEOUT_S) -> NodeAgent:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.state_dir / "agent-config.json"
        config_file.write_text(self.config.to_json())
        ready = self.state_dir / "ready.json"
        ready.unlink(missing_ok=True)
        # `python -m <this package>` with the folder above the package on PYTHONPATH, whatever the package is
        # called (``tests.nodeagent`` or ``nodeagent``).
        package = __package__ or "nodeagent"
        import_root = Path(__file__).resolve().parents[len(package.split("."))]
        venv_bin = Path(sys.executable).parent
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(REPO_ROOT / ".tools" / "bin"), str(venv_bin), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(import_root), env.get("PYTHONPATH", "")] if p)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", package, "--config", str(config_file), "--ready-file", str(ready)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            self.check()
            if time.monotonic() > deadline:
                self.stop()
                raise NodeAgentError(f"node agent not ready after {timeout:.0f}s\n{self.log_tail()}")
            time.sleep(0.1)
        self.info = json.loads(ready.read_text())
        return self

    def check(self) -> None:
        """Raise NodeAgentError when the agent process has exited."""
        if self._proc is not None and self._proc.poll() is not None:
            raise NodeAgentError(f"node agent exited with {self._proc.returncode}\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)

    def kill(self) -> None:
        """SIGKILL the agent, as a crash would (its pod processes die with it; nodes and hosts entries stay)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(30)

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_file.exists():
            return ""
        return "".join(self.log_file.read_text(errors="replace").splitlines(keepends=True)[-lines:])

    # ---- pods ------------------------------------------------------------------------------------------------
    def pod_dir(self, namespace: str, pod: str) -> Path:
        """The state folder of the newest pod with this name (``work/`` is its working dir)."""
        directory = layout.latest_pod_dir(self.state_dir, namespace, pod)
        if directory is None:
            raise FileNotFoundError(f"node agent never ran pod {namespace}/{pod}")
        return directory

    def workdir(self, namespace: str, pod: str) -> Path:
        return self.pod_dir(namespace, pod) / "work"

    def pids(self, namespace: str, pod: str) -> list[int]:
        """The running processes of the pod's containers: those whose working directory is the pod's (every
        container process, and every process they start, runs there)."""
        workdir = self.workdir(namespace, pod).resolve()
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    if (proc / "cwd").readlink() == workdir:
                        found.append(int(proc.name))
        return found

    def logs(
        self,
        namespace: str,
        pod: str,
        container: str | None = None,
        *,
        previous: bool = False,
        timestamps: bool = False,
        tail_lines: int | None = None,
    ) -> str:
        """What ``kubectl logs`` shows: the output of the container's current (or previous) run."""
        directory = self.pod_dir(namespace, pod)
        name = container or layout.default_container(directory)
        path = layout.find_log(directory, name, previous=previous)
        if path is None:
            return ""
        return read_log(path, timestamps=timestamps, tail_lines=tail_lines)


@pytest.fixture(scope="session")
def node_agent_settings() -> dict[str, Any]:
    """``AgentConfig`` fields to override (a conftest may redefine this fixture)."""
    return {}


@pytest.fixture(scope="session")
def node_agent(
    cluster: Any, node_agent_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeAgent]:
    """A node agent with fake GPU nodes registered in ``cluster`` (session-wide)."""
    state = tmp_path_factory.mktemp("node-agent")
    config = AgentConfig(
        kubeconfig=str(cluster.kubeconfig), state_dir=str(state), parent_pid=os.getpid(), **node_agent_settings
    )
    log_dir = Path(getattr(cluster, "log_dir", state))
    agent = NodeAgent(config, log_dir / "node-agent.log").start()
    try:
        yield agent
    finally:
        agent.stop()

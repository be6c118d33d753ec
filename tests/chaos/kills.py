"""SIGKILLs for the chaos tests: of a pod's container processes (found through the node agent: the processes
whose working directory is the pod's) and of the operator process."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from tests.infra.operator import OperatorProcess


def pod_process_groups(node_agent: Any, namespace: str, pod: str) -> set[int]:
    """The process groups of the pod's running containers (each container run leads its own group)."""
    groups: set[int] = set()
    for pid in node_agent.pids(namespace, pod):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    return groups


def kill_pod_processes(node_agent: Any, namespace: str, pod: str) -> int:
    """SIGKILL every process of the pod's containers, as the OOM killer or a crash would; return how many groups."""
    groups = pod_process_groups(node_agent, namespace, pod)
    assert groups, f"no process of pod {namespace}/{pod} is running"
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    return len(groups)


def kill_operator(op: OperatorProcess) -> None:
    """SIGKILL the operator process (no shutdown handlers run), and reap it."""
    assert op.process is not None
    assert op.process.running(), op.log_tail()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(op.process.pid, signal.SIGKILL)
    op.process.popen.wait(30)
    op.process.stop()
    op.process = None

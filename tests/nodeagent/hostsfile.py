"""Pod hostnames in ``/etc/hosts``.

Why: Indexed Jobs give pods ``spec.hostname`` + ``spec.subdomain``, and the trainer's rendezvous address is
``<job>-0.<service>``. There is no cluster DNS here, and the pods are plain processes that resolve names through
glibc (torch's c10d store too), so the one place every process consults is ``/etc/hosts`` (we run as root).
Each agent owns one block, marked with its id and pid, rewritten in place under an ``flock`` so concurrent agents
on the machine do not lose each other's updates. The block is removed when the
agent stops; a block whose pid is dead (an agent that crashed) is removed by the next agent that writes.

The short name ``<hostname>.<subdomain>`` is global in ``/etc/hosts``, so two agents (two test sessions on this
machine) running pods with the same hostname and subdomain shadow each other there (the first block wins; the agent
logs a warning). Pods therefore do not read the machine's file: each pod process gets its own mount namespace with
its namespace's *view* bind-mounted over ``/etc/hosts`` (``render_view``): the machine's entries without any agent
block, the short names of its own namespace's pods (what the DNS search path ``<ns>.svc.cluster.local`` gives)
and the namespaced names of this agent's other pods. Views are rewritten in place, never renamed, because a bind
mount pins the file's inode. Where mount namespaces are not available, pods fall back to the machine's file.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .runtime import process_running

BEGIN = "# BEGIN dreambooth-operator test node agent"
END = "# END dreambooth-operator test node agent"
_BLOCK = re.compile(rf"^{re.escape(BEGIN)} (?P<id>\S+) pid=(?P<pid>\d+)\n.*?^{re.escape(END)} (?P=id)\n", re.M | re.S)


def pod_names(hostname: str, subdomain: str, namespace: str, cluster_domain: str = "cluster.local") -> list[str]:
    """The names that cluster DNS would give a pod with ``hostname`` and ``subdomain``."""
    if not hostname or not subdomain:
        return []
    base = f"{hostname}.{subdomain}"
    return [base, f"{base}.{namespace}", f"{base}.{namespace}.svc", f"{base}.{namespace}.svc.{cluster_domain}"]


@dataclass(frozen=True)
class PodHost:
    """A pod's address and DNS identity."""

    ip: str
    namespace: str
    hostname: str = ""
    subdomain: str = ""

    def names(self) -> list[str]:
        return pod_names(self.hostname, self.subdomain, self.namespace)


def strip_blocks(text: str) -> str:
    """``text`` without any agent's block."""
    return _BLOCK.sub("", text)


def render_view(machine_hosts: str, pods: Iterable[PodHost], namespace: str) -> str:
    """The hosts file that the pods of ``namespace`` see."""
    base = strip_blocks(machine_hosts)
    if base and not base.endswith("\n"):
        base += "\n"
    lines = [f"# node agent: pod names as seen from namespace {namespace}"]
    for pod in sorted(pods, key=lambda p: (p.ip, p.namespace)):
        names = pod.names() if pod.namespace == namespace else pod.names()[1:]
        if names:
            lines.append(f"{pod.ip}\t{' '.join(names)}")
    return base + "\n".join(lines) + "\n"


def write_in_place(path: Path, text: str) -> None:
    """Rewrite ``path`` keeping its inode (bind mounts of it see the new content)."""
    if path.exists() and path.read_text() == text:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+") as handle:
        handle.write(text)
        handle.truncate()


def render_block(agent_id: str, pid: int, entries: Mapping[str, Iterable[str]]) -> str:
    """The marked block: one ``ip name...`` line per pod IP, sorted for stable output."""
    lines = [
        f"{BEGIN} {agent_id} pid={pid}",
        "# pod hostnames for local test processes (no cluster DNS); removed on stop",
    ]
    lines += [f"{ip}\t{' '.join(names)}" for ip, names in sorted(entries.items()) if names]
    lines.append(f"{END} {agent_id}")
    return "\n".join(lines) + "\n"


def replace_block(text: str, agent_id: str, block: str | None, pid_alive: Callable[[int], bool]) -> str:
    """``text`` with this agent's block replaced by ``block`` (removed when None) and dead agents' blocks dropped."""

    def keep(match: re.Match[str]) -> str:
        if match.group("id") == agent_id:
            return ""
        return match.group(0) if pid_alive(int(match.group("pid"))) else ""

    rest = _BLOCK.sub(keep, text)
    if block is None:
        return rest
    if rest and not rest.endswith("\n"):
        rest += "\n"
    return rest + block


def names_of_others(text: str, agent_id: str) -> set[str]:
    """The names in the other agents' blocks of ``text``."""
    names: set[str] = set()
    for match in _BLOCK.finditer(text):
        if match.group("id") == agent_id:
            continue
        for line in match.group(0).splitlines():
            if line and not line.startswith("#"):
                names.update(line.split()[1:])
    return names


def pid_alive(pid: int) -> bool:
    return process_running(pid)


class HostsFile:
    """This agent's block in a hosts file."""

    def __init__(self, agent_id: str, path: Path = Path("/etc/hosts"), lock_path: Path | None = None) -> None:
        self.agent_id = agent_id
        self.path = path
        self.lock_path = lock_path or Path("/tmp/dbo-nodeagent/hosts.lock")

    def write(self, entries: Mapping[str, Iterable[str]]) -> set[str]:
        """Write this agent's block; returns the names that another live agent's block maps too (shadowed)."""
        entries = {ip: list(names) for ip, names in entries.items()}
        text = self._rewrite(render_block(self.agent_id, os.getpid(), entries))
        ours = {name for names in entries.values() for name in names}
        return ours & names_of_others(text, self.agent_id)

    def remove(self) -> None:
        self._rewrite(None)

    def _rewrite(self, block: str | None) -> str:
        """Replace this agent's block; returns the new file text."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock_path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = self.path.read_text() if self.path.exists() else ""
            new = replace_block(old, self.agent_id, block, pid_alive)
            if new == old:
                return new
            # In place, never by rename: renaming over /etc/hosts would detach the pods' private views that are
            # bind-mounted on it in their mount namespaces (the kernel drops mounts on a replaced dentry).
            write_in_place(self.path, new)
            return new

"""Pod hostnames in ``/etc/hosts``.

Why: Indexed Jobs give pods ``spec.hostname`` + ``spec.subdomain``, and the trainer's rendezvous address is
``<job>-0.<service>``. There is no cluster DNS here, and the pods are plain processes that resolve names through
glibc (torch's c10d store too), so the one place every process consults is ``/etc/hosts`` (we run as root).
Each agent owns one block, marked with its id and pid, rewritten atomically (write a temporary file, rename) under
an ``flock`` so concurrent agents on the machine do not lose each other's updates. The block is removed when the
agent stops; a block whose pid is dead (an agent that crashed) is removed by the next agent that writes.

Limitation: the short name ``<hostname>.<subdomain>`` is global on this machine, so two concurrent agents running
pods with the same hostname and subdomain would shadow each other (the first block wins); the namespaced names
(``<hostname>.<subdomain>.<ns>.svc.cluster.local``) are unique.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
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
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".hosts.nodeagent.")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(new)
                Path(tmp).chmod(0o644)
                Path(tmp).replace(self.path)
            except OSError:
                # A bind-mounted hosts file cannot be replaced by rename; rewrite it in place instead.
                Path(tmp).unlink(missing_ok=True)
                with self.path.open("r+") as handle:
                    handle.write(new)
                    handle.truncate()
            return new

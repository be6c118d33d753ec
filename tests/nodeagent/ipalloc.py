"""Pod IPs on the loopback network: 127.0.0.0/8 routes to ``lo`` on Linux, so every address works without setup.

Several agents (other engineers' test sessions) may run on one machine at once. Each agent claims a whole
``127.<k>.0.0/16`` by holding an exclusive ``flock`` on ``<lock_dir>/subnet-<k>.lock`` for its lifetime (the kernel
drops the lock when the process dies), so no two live agents hand out the same address. Inside its subnet the
allocator never reuses an address while another is free, so a new pod does not meet the old pod's sockets in
TIME_WAIT.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
from pathlib import Path
from typing import IO

FIRST_OCTET = 127
DEFAULT_LOCK_DIR = Path("/tmp/dbo-nodeagent")  # machine-wide on purpose: every agent must see the same locks


class IPAllocator:
    """Round-robin allocation in ``127.<k>.0.0/16`` (``.0.0``, ``.0.1`` and ``.255.255`` are never handed out)."""

    def __init__(self, second_octet: int) -> None:
        if not 1 <= second_octet <= 254:
            raise ValueError(f"second octet must be in 1..254, not {second_octet}")
        self.network = ipaddress.IPv4Network(f"{FIRST_OCTET}.{second_octet}.0.0/16")
        self._base = int(self.network.network_address)
        self._size = self.network.num_addresses
        self._next = 2
        self._used: set[int] = set()

    def allocate(self) -> str:
        """A free address; raises RuntimeError when all are in use."""
        for _ in range(self._size):
            offset = self._next
            self._next = self._next + 1 if self._next + 1 < self._size - 1 else 2
            if offset not in self._used:
                self._used.add(offset)
                return str(ipaddress.IPv4Address(self._base + offset))
        raise RuntimeError(f"no free pod IP left in {self.network}")

    def release(self, ip: str) -> None:
        """Give an address back (unknown addresses are ignored)."""
        self._used.discard(int(ipaddress.IPv4Address(ip)) - self._base)

    def in_use(self) -> set[str]:
        return {str(ipaddress.IPv4Address(self._base + offset)) for offset in self._used}


class SubnetClaim:
    """An exclusive, process-lifetime claim on one ``127.<k>.0.0/16``; ``close()`` gives it back."""

    def __init__(self, second_octet: int, handle: IO[str]) -> None:
        self.second_octet = second_octet
        self._handle = handle

    def close(self) -> None:
        self._handle.close()


def claim_subnet(lock_dir: Path = DEFAULT_LOCK_DIR, candidates: range = range(10, 255)) -> SubnetClaim:
    """Claim the first subnet that no live agent holds (127.0/16 and the low ones are left to other uses)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for k in candidates:
        handle = (lock_dir / f"subnet-{k}.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return SubnetClaim(k, handle)
    raise RuntimeError(f"every pod subnet in {lock_dir} is claimed")

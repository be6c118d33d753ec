"""The distributed environment the operator's pod template sets (docs/contracts.md), and how ranks agree and part.

`PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT` (torchrun style) and
`MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `NODE_RANK` (what Lightning reads). Fabric launches
`nproc_per_node` processes per node (one per GPU, or that many CPU processes with gloo) and sets LOCAL_RANK.

Every decision that ends a rank's run is taken by all ranks together, at the same point of the program, through a
collective (`agree_any`, `on_rank0`, the loop's per-step all-reduce): a rank never leaves while a peer waits in a
collective for it. At the end, `leave` meets the others in one last collective and destroys the process group
before the interpreter exits. Without that, a rank that exits right after its last collective can abort (SIGABRT,
"terminate called without an active exception"): the backend's worker thread still holds that collective's
tensors, needs the GIL to free them, and a finalizing interpreter ends such a thread with a forced unwind through
a noexcept destructor. Destroying the group releases the GIL and joins those threads first.

Rank 0 serves the rendezvous (torch's TCPStore) on MASTER_ADDR only (`serve_rendezvous`), not on every address of
the machine as torch's own store does.

Torch is imported lazily: the local-rank supervisor (launcher.py) imports this module and never needs it.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from dreambooth_api.env import (
    PET_MASTER_ADDR,
    PET_MASTER_PORT,
    PET_NNODES,
    PET_NODE_RANK,
    PET_NPROC_PER_NODE,
    TRAINER_MASTER_PORT,
)
from dreambooth_api.exitcodes import ExitCode, InvalidInputError, RetryableError, TrainerError

T = TypeVar("T")
ALL_RANKS = "raised_on_all_ranks"
"""Attribute set on an error that every rank raised at the same point (so they can still meet in `leave`)."""


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        raw = env.get(name)
        if raw:
            try:
                return int(raw)
            except ValueError as err:
                raise InvalidInputError(f"environment variable {name}={raw!r} is not an integer") from err
    return default


@dataclass(frozen=True)
class DistEnv:
    num_nodes: int
    procs_per_node: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.procs_per_node

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def lightning_env(self) -> dict[str, str]:
        """The variables Lightning's LightningEnvironment reads, consistent with the PET_* ones."""
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "NODE_RANK": str(self.node_rank),
            "WORLD_SIZE": str(self.world_size),
        }


def read_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the distributed settings; PET_* win over the Lightning names when both are set."""
    e = os.environ if env is None else env
    nnodes = _int(e, PET_NNODES, default=1)
    nproc = _int(e, PET_NPROC_PER_NODE, default=0)
    if nproc == 0:
        world = _int(e, "WORLD_SIZE", default=nnodes)
        nproc = max(world // max(nnodes, 1), 1)
    node_rank = _int(e, PET_NODE_RANK, "NODE_RANK", default=0)
    addr = e.get(PET_MASTER_ADDR) or e.get("MASTER_ADDR") or "127.0.0.1"
    port = _int(e, PET_MASTER_PORT, "MASTER_PORT", default=TRAINER_MASTER_PORT)
    if nnodes < 1 or nproc < 1:
        raise InvalidInputError(f"need PET_NNODES >= 1 and PET_NPROC_PER_NODE >= 1, got {nnodes} and {nproc}")
    if not 0 <= node_rank < nnodes:
        raise InvalidInputError(f"node rank {node_rank} is outside 0..{nnodes - 1}")
    world = _int(e, "WORLD_SIZE", default=nnodes * nproc)
    if world != nnodes * nproc:
        raise InvalidInputError(f"WORLD_SIZE={world} but PET_NNODES * PET_NPROC_PER_NODE = {nnodes * nproc}")
    return DistEnv(nnodes, nproc, node_rank, addr, port)


RENDEZVOUS_TIMEOUT_SECONDS = 1800.0
"""How long a rank waits for the rendezvous store (torch's default process-group timeout)."""
_served: list[Any] = []
"""The rendezvous store this process serves, alive until the process group is gone (`leave`)."""


def global_rank(d: DistEnv, env: Mapping[str, str] | None = None) -> int:
    """This process's rank: RANK (the local-rank supervisor sets it), else node rank x procs per node + LOCAL_RANK."""
    e = os.environ if env is None else env
    local = _int(e, "LOCAL_RANK", default=0)
    return _int(e, "RANK", default=d.node_rank * d.procs_per_node + local)


def serve_rendezvous(d: DistEnv, rank: int) -> bool:
    """On rank 0, before the process group starts: serve the rendezvous store on MASTER_ADDR:MASTER_PORT only.

    Torch's own store listens on every address of the machine. Where pods share one network namespace (the test
    cluster's node agent, whose pods are processes with their own loopback addresses; pods with hostNetwork), two
    gangs then collide on the port: the later rank 0 cannot listen (EADDRINUSE, a retryable failure that restarts
    the gang), and its peers, which connect to its address, reach the other gang's store through that wildcard
    listener and wait there until they are killed. Bound to rank 0's own address, each gang meets only its own.

    The store is created multi-tenant, so `init_process_group` (Fabric's) finds it in this process and uses it.
    Returns False (torch serves it as usual) on other ranks, in one process, and where MASTER_ADDR does not resolve
    to an address of this machine. Raises RetryableError when that address and port are taken."""
    if rank != 0 or not d.is_distributed or _served:
        return False
    try:
        family, kind, proto, _, address = socket.getaddrinfo(d.master_addr, d.master_port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError):
        return False
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise RetryableError(
                f"the rendezvous port {d.master_port} on {d.master_addr} ({address[0]}) is taken by another process"
            ) from err
        return False  # not an address of this machine (EADDRNOTAVAIL): torch listens on every address
    from datetime import timedelta

    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    try:
        store = TCPStore(
            d.master_addr,
            d.master_port,
            d.world_size,
            is_master=True,
            timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_SECONDS),
            wait_for_workers=False,
            multi_tenant=True,
            master_listen_fd=sock.fileno(),
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now
    _served.append(store)
    return True


def broadcast_object(fabric: Any, obj: Any, src: int = 0) -> Any:
    """Fabric's broadcast (pickles any object) that is a no-op on one process."""
    if fabric.world_size == 1:
        return obj
    return fabric.broadcast(obj, src=src)


def _initialized(fabric: Any) -> bool:
    if int(fabric.world_size) == 1:
        return False
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def on_all_ranks(err: BaseException) -> BaseException:
    """Mark `err` as raised by every rank at the same point of the program."""
    setattr(err, ALL_RANKS, True)
    return err


def raised_on_all_ranks(err: BaseException) -> bool:
    return bool(getattr(err, ALL_RANKS, False))


def agree_any(fabric: Any, flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank: one all-reduce that every rank must call at the same
    point (a stop decision taken together, so no rank leaves while a peer waits for it in a collective)."""
    if not _initialized(fabric):
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=fabric.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class PeerError(TrainerError):
    """Rank 0's error, raised on the other ranks with the same exit code and reason."""

    def __init__(self, message: str, exit_code: int, reason: str) -> None:
        super().__init__(message)
        try:
            self.exit_code = ExitCode(exit_code)
        except ValueError:
            self.exit_code = ExitCode.RETRYABLE
        self.reason = reason


def on_rank0(fabric: Any, fn: Callable[[], T], classify: Callable[[BaseException], tuple[int, str]]) -> T:
    """Run `fn` on rank 0 and broadcast its outcome: its (picklable) value on every rank, or its error raised on
    every rank (rank 0 its own, the others a `PeerError` with the exit code and reason `classify` gives), so that
    the ranks leave the run at this point together instead of some waiting for the others in a collective."""
    if not _initialized(fabric):
        return fn()
    error: BaseException | None = None
    outcome: tuple[bool, Any, int, str] = (True, None, 0, "")
    if int(fabric.global_rank) == 0:
        try:
            outcome = (True, fn(), 0, "")
        except Exception as err:  # broadcast first: the others wait for this outcome
            error = err
            code, reason = classify(err)
            outcome = (False, str(err) or type(err).__name__, int(code), reason)
    ok, payload, code, reason = broadcast_object(fabric, outcome)
    if not ok:
        raise on_all_ranks(error if error is not None else PeerError(f"rank 0: {payload}", code, reason))
    value: T = payload
    return value


def leave(fabric: Any, *, together: bool, log: Any = None) -> None:
    """Leave the process group before the interpreter exits. `together`: every rank got here at the same point
    (a normal end, or an error raised on all ranks), so they meet in one last collective first; then the group is
    destroyed, which joins the backend's threads with the GIL released. After an error of this rank alone the peers
    may be inside a collective that will never complete: nothing is waited for, the group is left to process exit."""
    if not together or not _initialized(fabric):
        return
    import torch
    import torch.distributed as dist

    last = torch.zeros(1, device=fabric.device)  # alive until the group is gone: its worker never needs the GIL
    try:
        dist.all_reduce(last)
        float(last.item())
    except Exception as err:  # a peer died after its result: this rank's outcome stands
        if log is not None:
            log.warning("process_group_left", error=str(err))
    dist.destroy_process_group()
    del last
    _served.clear()  # the rendezvous server stops with the group, while the interpreter is still whole

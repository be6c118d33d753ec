"""The distributed environment the operator's pod template sets (docs/contracts.md).

`PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT` (torchrun style) and
`MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `NODE_RANK` (what Lightning reads). Fabric launches
`nproc_per_node` processes per node (one per GPU, or that many CPU processes with gloo) and sets LOCAL_RANK.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dreambooth_api.env import (
    PET_MASTER_ADDR,
    PET_MASTER_PORT,
    PET_NNODES,
    PET_NODE_RANK,
    PET_NPROC_PER_NODE,
    TRAINER_MASTER_PORT,
)
from dreambooth_api.exitcodes import InvalidInputError


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


def broadcast_object(fabric: Any, obj: Any, src: int = 0) -> Any:
    """Fabric's broadcast (pickles any object) that is a no-op on one process."""
    if fabric.world_size == 1:
        return obj
    return fabric.broadcast(obj, src=src)

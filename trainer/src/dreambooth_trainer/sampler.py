"""A deterministic, resumable order of training examples.

The examples form an endless stream: epoch `e` is a permutation of `range(num_items)` drawn from
(seed, e), and the stream is the concatenation of epochs. A global batch of `global_batch` examples takes the
next `global_batch` stream positions; rank `r` gets the slice `[r * per_rank, (r + 1) * per_rank)` of it.
One process with batch 2B and two ranks with batch B each see the same examples per step, and the position
after any step is `step * global_batch`, so resume needs only the step (the state also stores epoch and index).
DreamBooth datasets are small (3-20 photos) and batches may straddle epochs; nothing is dropped or padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class SamplerState:
    position: int
    """Stream positions consumed so far (examples, summed over ranks)."""
    epoch: int
    """The epoch of the next position."""
    index: int
    """The index within that epoch of the next position."""

    def to_dict(self) -> dict[str, int]:
        return {"position": self.position, "epoch": self.epoch, "index": self.index}


class ResumableSampler:
    def __init__(
        self,
        num_items: int,
        per_rank_batch: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if num_items < 1:
            raise ValueError("the sampler needs at least one item")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_items = num_items
        self.per_rank_batch = per_rank_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.position = 0
        self._perm_cache: dict[int, np.ndarray[Any, np.dtype[np.int64]]] = {}

    @property
    def global_batch(self) -> int:
        return self.per_rank_batch * self.world_size

    def permutation(self, epoch: int) -> np.ndarray[Any, np.dtype[np.int64]]:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                perm = rng.permutation(self.num_items).astype(np.int64)
            else:
                perm = np.arange(self.num_items, dtype=np.int64)
            self._perm_cache = {epoch: perm}  # batches straddle at most two epochs; keep the newest
        return perm

    def item_at(self, position: int) -> int:
        epoch, index = divmod(position, self.num_items)
        return int(self.permutation(epoch)[index])

    def next_batch(self) -> list[int]:
        """This rank's item indices for the next micro-batch; advances by one global batch."""
        return [item for _epoch, item in self.next_batch_with_epochs()]

    def next_batch_with_epochs(self) -> list[tuple[int, int]]:
        """Like `next_batch`, with each item's epoch (datasets pick per-epoch crops and flips with it)."""
        start = self.position + self.rank * self.per_rank_batch
        batch = []
        for i in range(self.per_rank_batch):
            epoch, index = divmod(start + i, self.num_items)
            batch.append((epoch, int(self.permutation(epoch)[index])))
        self.position += self.global_batch
        return batch

    def state(self) -> SamplerState:
        epoch, index = divmod(self.position, self.num_items)
        return SamplerState(self.position, epoch, index)

    def state_dict(self) -> dict[str, int]:
        return self.state().to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

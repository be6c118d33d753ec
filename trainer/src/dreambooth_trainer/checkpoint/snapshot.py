"""Snapshots of the training state on the CPU, taken while the loop waits; the writer serializes them later.

`to_cpu` copies every tensor of a (nested) state dict; `StagingBuffers` copies CUDA tensors into pinned buffers
that it reuses from one snapshot to the next.
"""

from __future__ import annotations

from typing import Any

import torch


def to_cpu(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor detached, cloned and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True).contiguous()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


class StagingBuffers:
    """Reusable pinned CPU buffers for snapshots of CUDA tensors.

    `to_cpu` allocates pageable memory and copies each tensor synchronously: for a full SD 1.5 UNet with AdamW
    state (10 GB) that blocked training for 7.7 s per checkpoint on an H200 (bench/results/checkpoint.json).
    Here every CUDA tensor is copied with `non_blocking=True` into a pinned buffer kept from the previous
    snapshot, and one synchronize waits for all copies. The buffers are overwritten by the next snapshot, so it
    may only be taken after the previous one was written (`AsyncCheckpointer.wait()`). CPU tensors are cloned.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _copy(self, obj: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if not t.is_cuda:
                return t.to("cpu", copy=True).contiguous()
            buf = self._buffers.get(path)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self._buffers[path] = buf
            buf.copy_(t, non_blocking=True)
            return buf
        if isinstance(obj, dict):
            return {k: self._copy(v, (*path, k)) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            items = [self._copy(v, (*path, i)) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return obj

    def snapshot(self, obj: Any, name: str) -> Any:
        """Like `to_cpu(obj)`; `name` keeps different state dicts in different buffers."""
        out = self._copy(obj, (name,))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

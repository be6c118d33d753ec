"""Random-number-generator state: capture, restore, and per-step derivation.

Exact resume needs the same random stream after a restart. Two mechanisms give it:

- `seed_step(seed, slot, step)` reseeds python, numpy and torch (CPU and CUDA) before every micro-batch from
  (seed, slot, step), where slot = micro-batch index x world size + rank. Every micro-batch's randomness (noise,
  timesteps, dropout) is then a pure function of those numbers, whatever happened before. The slot also makes
  W ranks with batch B draw exactly what one process with batch B and W accumulation steps draws, so the two
  runs agree up to floating-point summation order.
- `capture()`/`restore()` save and load every generator's full state as JSON (no pickle) in the checkpoint,
  so code that draws random numbers outside the step (validation sampling) also continues where it stopped.
"""

from __future__ import annotations

import base64
import hashlib
import random
from typing import Any

import numpy as np
import torch

RngState = dict[str, Any]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (unlike seed + rank, which collides across steps)."""
    digest = hashlib.sha256(b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts)).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_step(seed: int, slot: int, step: int) -> None:
    """Reseed every generator for one micro-batch `slot` (micro index x world size + rank) of an optimizer step."""
    seed_all(derive_seed(seed, slot, step))


def _tensor_to_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_to_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture() -> RngState:
    """Every generator's state as a JSON-compatible dict."""
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    name, keys, pos, has_gauss, cached = np_state
    state: RngState = {
        "python": {"version": py_version, "state": list(py_internal), "gauss": py_gauss},
        "numpy": {
            "name": str(name),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "hasGauss": int(has_gauss),
            "cachedGaussian": float(cached),
        },
        "torch": _tensor_to_b64(torch.get_rng_state()),
        "cuda": [_tensor_to_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def restore(state: RngState) -> None:
    """Restore what `capture()` returned. CUDA states are restored for as many devices as both sides have."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["hasGauss"], n["cachedGaussian"])
    )
    torch.set_rng_state(_b64_to_tensor(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        count = min(len(cuda), torch.cuda.device_count())
        for i in range(count):
            torch.cuda.set_rng_state(_b64_to_tensor(cuda[i]), device=i)


def gather(world: int) -> list[RngState]:
    """Every rank's RNG state, in rank order (collective: every rank calls it; one process: its own)."""
    state = capture()
    if world == 1:
        return [state]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, state)
    return out

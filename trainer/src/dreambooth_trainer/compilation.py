"""`training.compileUnet`: what torch.compile needs from the pod, checked before any model is loaded.

Inductor generates C++ (CPU) or Triton (CUDA) kernels; Triton builds a small C launcher at first use. So both need a
compiler, and a missing one is a permanent error named up front, not a crash at the first training step.

Compiled kernels are cached on disk. When the pod has the shared model cache volume (`env.MODEL_CACHE_DIR`),
the inductor and Triton caches live there too, so only the first job with a given model shape pays the full
compile; later jobs load the kernels. Explicit TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR settings win.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from dreambooth_api.env import MODEL_CACHE_DIR
from dreambooth_api.exitcodes import InvalidInputError

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_CACHE_ENV = "TRITON_CACHE_DIR"
C_COMPILERS = ("cc", "gcc", "clang")  # Triton's launcher (CUDA)
CXX_COMPILERS = ("c++", "g++", "clang++")  # inductor's C++ kernels (CPU)


def cache_env(env: Mapping[str, str]) -> dict[str, str]:
    """The compile-cache variables to add to `env`: on the shared model cache volume, when there is one."""
    shared = env.get(MODEL_CACHE_DIR)
    if not shared:
        return {}
    root = Path(shared) / "torch-compile"
    wanted = {INDUCTOR_CACHE_ENV: str(root / "inductor"), TRITON_CACHE_ENV: str(root / "triton")}
    return {k: v for k, v in wanted.items() if not env.get(k)}


def missing_compiler(cuda: bool, path: str | None = None) -> str | None:
    """Why torch.compile cannot build kernels here, or None."""
    names = C_COMPILERS if cuda else CXX_COMPILERS
    if any(shutil.which(name, path=path) for name in names):
        return None
    return f"no {'C' if cuda else 'C++'} compiler ({', '.join(names)}) on PATH"


def prepare(cuda: bool, env: MutableMapping[str, str] | None = None) -> None:
    """Check the toolchain and point the compile caches at the shared volume (`env` defaults to os.environ)."""
    target = os.environ if env is None else env
    problem = missing_compiler(cuda, target.get("PATH"))
    if problem:
        raise InvalidInputError(f"training.compileUnet needs a compiler in the trainer image: {problem}")
    target.update(cache_env(target))

"""Keep optional packages that a run does not use out of its process.

diffusers, transformers and peft import bitsandbytes at start-up whenever it is installed (the trainer image has it
for `optimizer: adamw8bit`). That import loads its native library and costs about 2 s of every job's start on the
CPU, GPU time paid per subject by jobs that never use it. Marking a package as absent in `sys.modules` (None) makes
`importlib.util.find_spec` report it missing, so those libraries take their no-bitsandbytes path; an explicit
import raises ModuleNotFoundError. Only the entry points call this, before the heavy imports.
"""

from __future__ import annotations

import sys
from typing import Final

from dreambooth_api.config import JobConfig, Optimizer

EIGHT_BIT: Final = "bitsandbytes"


def unused_packages(config: JobConfig | None) -> list[str]:
    """Optional packages the run does not need: bitsandbytes unless it trains with adamw8bit (a server: None)."""
    if config is not None and config.training.optimizer is Optimizer.ADAMW_8BIT:
        return []
    return [EIGHT_BIT]


def keep_out(names: list[str]) -> list[str]:
    """Mark `names` absent for this process, unless already imported; returns those marked."""
    marked = [name for name in names if name not in sys.modules]
    for name in marked:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's documented "not found" marker
    return marked

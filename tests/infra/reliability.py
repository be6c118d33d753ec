"""Figures for bench/results/reliability.json: `record(kind, **figures)` appends one JSON line to the file named by
the environment variable DBO_RELIABILITY_RECORD (nothing when it is unset, as in `make test`).

`bench/bench_reliability.py` runs the chaos suite (tests/chaos), the storage-fault tests and the RBAC audit with it
set, and adds the lines up. What it reads:

- a fault: `kind` "<area>.<fault>" (for example "pod.eviction", "operator.sigkill", "storage.reset"), `injected`
  (how many), `survived` (how many the system came through: the job ended as it should), and where they apply
  `stepsRedone` (training steps done twice after the fault) and `dataLost` (checkpoints or steps lost: must be 0);
- kind "rbac": `used`, `granted` and `unused`, lists of "verb resource.group" (tests/e2e/test_rbac_audit.py).

Any other figure is kept as it is, under its kind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RECORD_ENV = "DBO_RELIABILITY_RECORD"


def record(kind: str, **figures: Any) -> None:
    """Append `{"kind": kind, **figures}` to $DBO_RELIABILITY_RECORD, if set."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    with Path(path).open("a", encoding="utf-8") as out:
        out.write(json.dumps({"kind": kind, **figures}, sort_keys=True) + "\n")

"""Writing a benchmark's result: bench/results/<name>.json, with the machine's load while it ran."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_result(results_dir: Path, filename: str, result: dict[str, Any]) -> dict[str, Any]:
    """Add the CPU count and load average to `result`, write it as `results_dir/filename`, and return it."""
    result = {**result, "cpus": os.cpu_count(), "loadAverage": list(os.getloadavg())}
    (results_dir / filename).write_text(json.dumps(result, indent=2) + "\n")
    return result

"""`make bench`: run every benchmark module and write JSON under bench/results/.

Each `bench/bench_*.py` module exposes `run(results_dir: Path) -> dict`; this runner calls them in turn (or
only those named on the command line, with or without the `bench_` prefix), records the machine they ran on,
and writes `bench/results/summary.json`.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def main(argv: list[str]) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    # `python -m bench operator_scale` and `python -m bench bench_operator_scale` name the same module.
    names = [a if a.startswith("bench_") else f"bench_{a}" for a in argv]
    names = names or sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    summary: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    failed = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"[bench] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            result = module.run(RESULTS)
        except Exception as err:  # a failing benchmark must not hide the others' results
            print(f"[bench] {name} failed: {err!r}", flush=True)
            failed.append(name)
            continue
        summary[name] = {"seconds": round(time.perf_counter() - start, 2), "result": result}
        print(json.dumps(result, indent=2), flush=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[bench] wrote {RESULTS / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

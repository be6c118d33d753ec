"""bench/results/reliability.json: faults injected into real jobs, and what came of them.

Runs, in one pytest session with DBO_RELIABILITY_RECORD set (tests/infra/reliability.py): the chaos suite
(tests/chaos: pod disruptions, operator SIGKILLs, an API-server outage), the storage-fault tests
(tests/integration/test_trainer_storage_faults.py: a fault proxy in front of the S3 server) and the RBAC audit
(tests/e2e/test_rbac_audit.py, run last: the verbs the session's operators used against the chart's grants).
Then it adds their records up: faults injected and survived by kind, steps redone (max and mean over the faults
that report them), data lost (must be 0), and RBAC verbs used vs granted (used by the operators of this session
only; the whole e2e run, `make test`, checks the rest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from bench.results_file import write_result

ROOT = Path(__file__).resolve().parents[1]
TESTS = (
    "tests/chaos",
    "tests/integration/test_trainer_storage_faults.py",
    "tests/e2e/test_rbac_audit.py",
)

KNOWN = frozenset({"kind", "injected", "survived", "dataLost", "stepsRedone"})
"""The figures every fault record may carry; any other goes to its kind's `details`."""


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The records (JSON lines of `record`) added up: by kind, in total, and the RBAC comparison."""
    by_kind: dict[str, dict[str, Any]] = {}
    redone: list[int] = []
    rbac: dict[str, Any] | None = None
    for rec in records:
        kind = str(rec["kind"])
        if kind == "rbac":
            used, granted = set(rec["used"]), set(rec["granted"])
            rbac = {
                "used": len(used),
                "granted": len(granted),
                "usedNotGranted": sorted(used - granted),
                "grantedNotUsed": sorted(rec.get("unused", granted - used)),
                "scope": "the operators of this session (the chaos suite): `make test` compares the whole e2e run",
            }
            continue
        entry = by_kind.setdefault(kind, {"injected": 0, "survived": 0, "dataLost": 0, "stepsRedone": []})
        entry["injected"] += int(rec.get("injected", 0))
        entry["survived"] += int(rec.get("survived", 0))
        entry["dataLost"] += int(rec.get("dataLost", 0))
        if "stepsRedone" in rec:
            entry["stepsRedone"].append(int(rec["stepsRedone"]))
            redone.append(int(rec["stepsRedone"]))
        details = {k: v for k, v in rec.items() if k not in KNOWN}
        if details:
            entry.setdefault("details", []).append(details)
    return {
        "faultsInjected": {k: v["injected"] for k, v in sorted(by_kind.items())},
        "faultsSurvived": {k: v["survived"] for k, v in sorted(by_kind.items())},
        "totals": {
            "injected": sum(v["injected"] for v in by_kind.values()),
            "survived": sum(v["survived"] for v in by_kind.values()),
            "dataLost": sum(v["dataLost"] for v in by_kind.values()),
        },
        "stepsRedone": {
            "max": max(redone, default=0),
            "mean": round(sum(redone) / len(redone), 2) if redone else 0.0,
            "faults": len(redone),
        },
        "dataLost": sum(v["dataLost"] for v in by_kind.values()),
        "rbac": rbac,
        "byKind": dict(sorted(by_kind.items())),
    }


def _test_counts(junit: Path) -> dict[str, int]:
    suite = ET.parse(junit).getroot()  # noqa: S314 - written by our own pytest run
    suite = suite if suite.tag == "testsuite" else suite[0]
    return {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}


def run(results_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dbo-reliability-") as tmp:
        records, junit = Path(tmp) / "records.jsonl", Path(tmp) / "junit.xml"
        records.touch()
        env = {**os.environ, "DBO_RELIABILITY_RECORD": str(records)}
        start = time.perf_counter()
        command = [sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        proc = subprocess.run(command, cwd=ROOT, env=env, check=False)
        seconds = round(time.perf_counter() - start, 1)
        lines = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
        counts = _test_counts(junit) if junit.exists() else {}
    result = {
        "tests": {"paths": list(TESTS), "seconds": seconds, "exitCode": proc.returncode, **counts},
        **aggregate(lines),
    }
    written = write_result(results_dir, "reliability.json", result)
    if proc.returncode != 0:
        msg = f"the reliability tests failed (exit {proc.returncode}); partial figures in reliability.json"
        raise RuntimeError(msg)
    return written


if __name__ == "__main__":
    print(json.dumps(run(ROOT / "bench" / "results"), indent=2))

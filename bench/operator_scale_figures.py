"""The operator scale benchmark's pure figures: job lists, percentiles, the status-lag schedule and its lags, the
settle test and the fake /progress document (tests/unit/bench/test_bench_operator_scale.py)."""

from __future__ import annotations

import json
import random
from typing import Any

CHILD_KINDS = ("Job", "Service", "ConfigMap")
TOTAL_STEPS = 10_000


def job_list(n: int, prefix: str, template: dict[str, Any]) -> dict[str, Any]:
    """A v1 List of `n` copies of `template` named `<prefix>-0000`, `<prefix>-0001`, ..."""
    items = []
    for i in range(n):
        copy = json.loads(json.dumps(template))
        copy["metadata"]["name"] = f"{prefix}-{i:04d}"
        copy["metadata"].pop("namespace", None)
        items.append(copy)
    return {"apiVersion": "v1", "kind": "List", "items": items}


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p95 (nearest rank) and max, rounded to 10 ms; None for no values."""
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 1)) - 1))], 2)

    return {"p50": rank(0.5), "p95": rank(0.95), "max": round(ordered[-1], 2)}


def children_complete(children: dict[str, dict[str, float]], jobs: list[str]) -> dict[str, float] | None:
    """Per job, when its last child (of CHILD_KINDS) appeared; None while any job lacks one."""
    done = {}
    for job in jobs:
        times = [children[kind].get(job) for kind in CHILD_KINDS]
        if any(t is None for t in times):
            return None
        done[job] = max(t for t in times if t is not None)
    return done


def change_schedule(jobs: list[str], rounds: int, period: float, seed: int) -> list[tuple[float, str, int]]:
    """(seconds from the start, job, new step) for every progress change, in time order: each job goes from step 1
    up by one `rounds` times, `period` apart, from a random offset in [0, period)."""
    draw = random.Random(seed)
    changes = []
    for job in jobs:
        offset = draw.uniform(0.0, period)
        changes += [(offset + r * period, job, 2 + r) for r in range(rounds)]
    return sorted(changes)


def status_lags(changes: list[tuple[float, str, int]], seen: dict[str, list[tuple[float, int]]]) -> list[float]:
    """For each change (time it was made, job, step), the time until the job's status first showed that step or a
    later one (`seen`: per job, (time, status.progress.step) in watch order). Changes never seen are left out."""
    lags = []
    for at, job, step in changes:
        shown = next((t for t, s in seen.get(job, []) if s >= step and t >= at), None)
        if shown is not None:
            lags.append(shown - at)
    return lags


def window_figures(
    seconds: float, cpu_seconds: float, reconciles: tuple[float, float], idle_jobs: int
) -> dict[str, Any]:
    """One measurement window: `reconciles` = (count, sum of seconds) of reconcile durations in it."""
    count, total = reconciles
    return {
        "jobs": idle_jobs,
        "windowSeconds": round(seconds, 1),
        "operatorCpuSeconds": round(cpu_seconds, 2),
        "operatorCpuCores": round(cpu_seconds / seconds, 4) if seconds > 0 else None,
        "reconcilesPerSecond": round(count / seconds, 2) if seconds > 0 else None,
        "meanReconcileSeconds": round(total / count, 4) if count else None,
    }


def reconcile_totals(metrics: str) -> tuple[float, float]:
    """(count, sum of seconds) of dreambooth_operator_reconcile_duration_seconds in a /metrics text."""
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("dreambooth_operator_reconcile_duration_seconds_")
    }
    prefix = "dreambooth_operator_reconcile_duration_seconds"
    return values.get(f"{prefix}_count", 0.0), values.get(f"{prefix}_sum", 0.0)


def settled(before: tuple[float, float], after: tuple[float, float], limit: float) -> bool:
    """Whether the operator's backlog is drained: the passes that ended between two reads of (count, sum of
    seconds) of its reconcile durations took under `limit` seconds on average, or none ended."""
    count = after[0] - before[0]
    return count <= 0 or (after[1] - before[1]) / count < limit


def progress_document(step: int) -> dict[str, Any]:
    """What a training rank 0 serves at /progress (docs/contracts.md), at `step`."""
    return {"phase": "Training", "step": step, "totalSteps": TOTAL_STEPS, "loss": 0.1, "stepsPerSecond": 1.0}


# --- the operator process -----------------------------------------------------------------------------------

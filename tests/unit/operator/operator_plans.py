"""Helpers of the reconcile and policy tests (test_operator_reconcile.py, test_operator_policy_*.py): run one
reconcile on observed objects, and read its plan."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from dreambooth_api.constants import ANNOTATION_COUNTED_PREEMPTIONS
from dreambooth_operator.observed import Attempt, Observed, ProgressSample, classify, parse_status
from dreambooth_operator.plan import Plan, PlanBuilder
from dreambooth_operator.reconcile import reconcile
from tests.infra.wrappers import T0

NOW = T0 + timedelta(seconds=30)


def run(
    job: dict[str, Any],
    batch_jobs: list[dict[str, Any]] | None = None,
    pods: list[dict[str, Any]] | None = None,
    now: datetime = NOW,
    progress: ProgressSample | None = None,
) -> Plan:
    return reconcile(Observed(job=job, batch_jobs=batch_jobs or [], pods=pods or [], now=now, progress=progress))


def cond(plan: Plan, type_: str) -> tuple[str, str] | None:
    """(status, reason) of the plan's condition `type_`."""
    c = next((c for c in plan.status.conditions if c.type == type_), None)
    return (c.status.value, c.reason) if c else None


def reasons(plan: Plan) -> list[tuple[str, str]]:
    """(type, reason) of the plan's events."""
    return [(e.type, e.reason) for e in plan.events]


def after(job: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The job as it looks once the plan's status (and annotation) were written."""
    job = {**job, "status": plan.status_wire()}
    if plan.counted_pods is not None:
        job["metadata"] = {
            **job["metadata"],
            "annotations": {ANNOTATION_COUNTED_PREEMPTIONS: json.dumps(plan.counted_pods)},
        }
    return job


def builder(job: dict[str, Any], now: datetime = NOW, **observed: Any) -> PlanBuilder:
    """A PlanBuilder over `job` (and `observed`: batch_jobs, pods, progress), to apply one policy by itself."""
    obs = Observed(
        job=job, batch_jobs=observed.pop("batch_jobs", []), pods=observed.pop("pods", []), now=now, **observed
    )
    return PlanBuilder(obs, parse_status(job), job["metadata"].get("generation"))


def attempt_of(b: PlanBuilder) -> Attempt:
    """The builder's observation classified against the job's current attempt."""
    return classify(b.obs, b.job_name, b.prev.attempt, [])

"""Single-node preemption policy: the Job controller replaces a preempted pod itself (its podFailurePolicy ignores
the failure), so the operator only counts each such pod once, by uid, remembered in a bounded annotation on the
DreamBoothJob so that an operator restart does not count it twice. (A gang's preemptions: policies/gang.py.)"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from dreambooth_api.constants import ANNOTATION_COUNTED_PREEMPTIONS, JobConditionType, Reason
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator import podstate
from dreambooth_operator.builders import is_queued_by_kueue
from dreambooth_operator.observed import Attempt
from dreambooth_operator.plan import PlanBuilder
from dreambooth_operator.policies import failure

COUNTED_PODS_KEEP: Final = 32


def counted_pods(annotations: Mapping[str, Any]) -> list[str]:
    """The uids in the counted-preemptions annotation (empty when absent or malformed)."""
    raw = annotations.get(ANNOTATION_COUNTED_PREEMPTIONS) or "[]"
    try:
        return [str(u) for u in json.loads(raw)]
    except (json.JSONDecodeError, TypeError):
        return []


def count(b: PlanBuilder, spec: DreamBoothJobSpec, attempt: Attempt) -> None:
    """Count the current attempt's newly preempted pods (b.counted_pods: the annotation's new value, if changed)."""
    if spec.resources.nodes != 1:
        return
    counted = counted_pods(b.obs.job.get("metadata", {}).get("annotations") or {})
    new = [
        podstate.pod_uid(p)
        for p in attempt.pods
        if failure.classify(p) is failure.FailureKind.PREEMPTED and podstate.pod_uid(p) not in counted
    ]
    if not new:
        return
    b.counted_pods = (counted + new)[-COUNTED_PODS_KEEP:]
    queue_suspended = (
        is_queued_by_kueue(b.obs.job) and attempt.batch_job is not None and podstate.job_suspended(attempt.batch_job)
    )
    if spec.run_policy.suspend or queue_suspended:
        # Pods that the Job controller stops for a user's suspend exit 12 too: remembered, not counted. So are those
        # stopped because the queue (Kueue) suspended the Job: policies/suspend.py counts that eviction once.
        return
    b.status.restarts.preemptions += len(new)
    b.condition(
        JobConditionType.RUNNING,
        False,
        Reason.PREEMPTED,
        f"{len(new)} pod(s) preempted; the Job controller replaces them and training resumes from the last checkpoint",
    )

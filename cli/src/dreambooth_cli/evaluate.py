"""`dreambooth evaluate NAME`: evaluate a succeeded job's exported model again, in the cluster.

The CLI sets the annotation dreambooth.dev/evaluate to a fresh token; the operator runs the batch Job `<job>-eval`
(the trainer image, no training) and records the token in status.observedEvaluateRequest once it has served it, with
the outcome in the condition Reevaluated and the new scores in status.outputs. This module holds the request (a merge
patch of the annotation), the pure reading of its outcome, and the wait.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from dreambooth_api import constants as api
from dreambooth_cli import kube, present
from dreambooth_cli.errors import CliError, ExitStatus
from dreambooth_cli.jobinfo import JobInfo

EVALUATION_ROWS: Final = ("evaluation ", "quality gate")
"""The `status` detail rows (present.detail_rows) that `evaluate` prints: the scores, the gate, the detail's URI."""


def is_local_run(source: str) -> bool:
    """`evaluate DIR` (an existing local folder: a local run) rather than `evaluate NAME` (a job in the cluster)."""
    return Path(source).is_dir()


def new_token(now: datetime | None = None) -> str:
    """A fresh request token: the time (readable in `kubectl get -o yaml`) and random hex (unique)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Outcome:
    """What the operator recorded for one request."""

    reason: str
    """The Reevaluated condition's reason: Reevaluated, ReevaluationFailed or ReevaluationNotPossible."""
    message: str

    @property
    def ok(self) -> bool:
        return self.reason == api.Reason.REEVALUATED


@dataclass(frozen=True)
class Evaluation:
    """A served request (`DreamBoothClient.evaluate`): its token, the job as read when the operator had served it (the
    new scores in `job.status.outputs`, `job.quality_gate_failed`), and the outcome."""

    token: str
    job: JobInfo
    outcome: Outcome


def outcome(job: dict[str, Any], token: str) -> Outcome | None:
    """The outcome of request `token`, None while the operator has not served it."""
    status = present.status_of(job)
    if status.get("observedEvaluateRequest") != token:
        return None
    for c in status.get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == api.JobConditionType.REEVALUATED:
            return Outcome(str(c.get("reason") or ""), str(c.get("message") or ""))
    return Outcome(api.Reason.REEVALUATION_FAILED.value, "the operator recorded the request without an outcome")


def progress_line(job: dict[str, Any], token: str) -> str:
    """While the request waits: the Reevaluated condition's message when it is about this request."""
    for c in present.status_of(job).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == api.JobConditionType.REEVALUATED:
            message = str(c.get("message") or "")
            if message.startswith(f"request {token}:"):
                return message.removeprefix(f"request {token}:").strip()
    return "waiting for the operator"


def score_rows(job: dict[str, Any]) -> list[tuple[str, str]]:
    """The evaluation rows of `dreambooth status`: scores, quality gate, detail."""
    return [(k, v) for k, v in present.detail_rows(job) if k.startswith(EVALUATION_ROWS)]


def request(target: kube.Target, name: str, token: str) -> None:
    """Set the job's evaluation request (a merge patch of its annotation; the job must exist)."""
    kube.get_job(target, name)  # a clear "not found" first
    patch = {"metadata": {"annotations": {api.ANNOTATION_EVALUATE: token}}}
    kube.call(
        target,
        target.custom.patch_namespaced_custom_object,
        api.GROUP,
        api.VERSION,
        target.namespace,
        api.JOB_PLURAL,
        name,
        patch,
    )


def wait(
    target: kube.Target,
    name: str,
    token: str,
    *,
    timeout: float | None,
    interval: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[JobInfo]:
    """The job read every `interval` seconds until (and including) the read in which request `token` is served."""
    deadline = clock() + timeout if timeout else None
    while True:
        job = JobInfo.from_object(kube.get_job(target, name), target.namespace)
        yield job
        if outcome(job.raw, token) is not None:
            return
        if deadline is not None and clock() > deadline:
            raise CliError(f"{name}: evaluation request {token} not served after {timeout:g}s", ExitStatus.ERROR)
        sleep(interval)

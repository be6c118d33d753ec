"""`JobInfo`: a DreamBoothJob as the client returns it (the facts most callers want, and the object itself)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dreambooth_api import constants as api
from dreambooth_api.job import DreamBoothJobStatus
from dreambooth_cli import present
from dreambooth_cli.events import Progress


@dataclass(frozen=True)
class JobInfo:
    """A DreamBoothJob as read from the cluster: the facts most callers want, and the object itself (`raw`)."""

    name: str
    namespace: str
    phase: str
    """A `JobPhase` value ("Pending" until the operator writes one)."""
    progress: Progress
    """Steps, loss, learning rate, speed and ETA from status.progress (total steps from the spec until then)."""
    raw: dict[str, Any]
    """The custom object as the API server returned it."""

    @classmethod
    def from_object(cls, job: dict[str, Any], namespace: str = "") -> JobInfo:
        meta = job.get("metadata") or {}
        return cls(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace") or namespace),
            phase=present.phase_of(job),
            progress=present.progress_of(job),
            raw=job,
        )

    @property
    def status(self) -> DreamBoothJobStatus:
        """status as the typed contract model (raises pydantic's ValidationError for a status it does not allow)."""
        return DreamBoothJobStatus.model_validate(present.status_of(self.raw))

    @property
    def terminal(self) -> bool:
        """Succeeded or Failed: nothing will change any more."""
        return self.phase in api.TERMINAL_JOB_PHASES

    @property
    def succeeded(self) -> bool:
        return self.phase == api.JobPhase.SUCCEEDED

    @property
    def failed(self) -> bool:
        return self.phase == api.JobPhase.FAILED

    @property
    def model_uri(self) -> str | None:
        """status.outputs.modelUri: where the exported model is, once the job succeeded."""
        uri = (present.status_of(self.raw).get("outputs") or {}).get("modelUri")
        return str(uri) if uri else None

    @property
    def quality_gate_failed(self) -> str | None:
        """The QualityGateFailed condition's message when it is True (the job succeeded under minScore), else None."""
        for c in present.status_of(self.raw).get("conditions") or []:
            if isinstance(c, dict) and c.get("type") == api.JobConditionType.QUALITY_GATE_FAILED:
                return str(c.get("message") or "below evaluation.minScore") if c.get("status") == "True" else None
        return None

    @property
    def failure_message(self) -> str:
        """`Reason: message` of the Failed condition, else status.message."""
        status = present.status_of(self.raw)
        for c in status.get("conditions") or []:
            if isinstance(c, dict) and c.get("type") == "Failed" and c.get("status") == "True":
                return f"{c.get('reason', 'Failed')}: {c.get('message', '')}".rstrip(": ")
        return str(status.get("message") or "failed")

"""Errors the CLI reports as one line and a non-zero exit status (a traceback only with --debug)."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """Exit statuses of the `dreambooth` command."""

    OK = 0
    ERROR = 1
    """Anything else: a failed upload, an API error."""
    INVALID_INPUT = 2
    """A missing file, invalid YAML, a schema violation (typer also uses 2 for bad arguments)."""
    NO_CLUSTER = 3
    """No cluster reachable, or no usable kubeconfig."""
    JOB_FAILED = 4
    """The job (or the local training run) failed."""
    NOT_FOUND = 5
    """The named job does not exist."""
    ALREADY_EXISTS = 6
    """`submit`: a job of that name already exists in the namespace."""
    QUALITY_GATE_FAILED = 7
    """`watch`, `status`: the job succeeded but its evaluation is under `evaluation.minScore` (QualityGateFailed)."""


class CliError(Exception):
    """An expected failure: printed as `error: <message>` with its exit status."""

    def __init__(self, message: str, status: ExitStatus = ExitStatus.ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InputError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ExitStatus.INVALID_INPUT)


class ApiError(CliError):
    """A failed API call: `http_status` is the response's status, None when no response came (connection error)."""

    def __init__(self, message: str, status: ExitStatus, http_status: int | None) -> None:
        super().__init__(message, status)
        self.http_status = http_status

    @property
    def transient(self) -> bool:
        """Worth retrying: no response, 429 Too Many Requests or a 5xx."""
        return self.http_status is None or self.http_status == 429 or self.http_status >= 500

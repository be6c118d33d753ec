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


class CliError(Exception):
    """An expected failure: printed as `error: <message>` with its exit status."""

    def __init__(self, message: str, status: ExitStatus = ExitStatus.ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InputError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ExitStatus.INVALID_INPUT)

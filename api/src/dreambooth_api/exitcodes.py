"""The trainer's exit codes: the contract that the operator's podFailurePolicy relies on.

- 0 SUCCESS: trained and exported. The Job succeeds.
- 10 INVALID_INPUT: permanent (bad config, missing or undecodable image, wrong model path, a diverged loss).
  podFailurePolicy FailJob: the job fails at once with reason InvalidInput (the termination message's reason says
  which: InvalidInput, LossDiverged).
- 11 RETRYABLE: transient (storage outage after retries, a collective-communication failure). Counts against
  backoffLimit.
- 12 PREEMPTED: got SIGTERM and wrote a checkpoint when it could. podFailurePolicy Ignore: the pod is recreated
  and resumes.

Any other non-zero code (a crash, OOM-kill 137) is treated like RETRYABLE.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    SUCCESS = 0
    INVALID_INPUT = 10
    RETRYABLE = 11
    PREEMPTED = 12


class TrainerError(Exception):
    """Base of errors that map to an exit code and a condition reason."""

    exit_code: ExitCode = ExitCode.RETRYABLE
    reason: str = "TrainingError"


class InvalidInputError(TrainerError):
    """Permanent: retrying cannot help (bad config, missing object, unreadable image, wrong model path)."""

    exit_code = ExitCode.INVALID_INPUT
    reason = "InvalidInput"


class LossDivergedError(InvalidInputError):
    """The loss was NaN or infinite for `training.maxNonFiniteLossSteps` optimizer steps in a row. Permanent: the
    run is seeded, so a new attempt with the same settings diverges again."""

    reason = "LossDiverged"


class StoppedError(TrainerError):
    """A preemption signal arrived before training started (loading the model, generating class images): nothing
    needs a checkpoint (finished class images are cached), so the process stops at once with PREEMPTED."""

    exit_code = ExitCode.PREEMPTED
    reason = "Preempted"


class RetryableError(TrainerError):
    """Transient: a new attempt may succeed."""

    exit_code = ExitCode.RETRYABLE
    reason = "RetryableError"

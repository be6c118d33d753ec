"""The operator's copy of the trainer's exit codes agrees with the trainer (the contract's source of truth)."""

from __future__ import annotations

from dreambooth_operator import exitcodes
from dreambooth_trainer.exitcodes import ExitCode


def test_exit_codes_match_the_trainer() -> None:
    assert exitcodes.SUCCESS == ExitCode.SUCCESS
    assert exitcodes.INVALID_INPUT == ExitCode.INVALID_INPUT
    assert exitcodes.RETRYABLE == ExitCode.RETRYABLE
    assert exitcodes.PREEMPTED == ExitCode.PREEMPTED

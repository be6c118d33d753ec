"""The trainer's exit codes, duplicated from the contract.

The operator may not import dreambooth_trainer (import-linter contract), so the numbers are repeated here.
Source of truth: trainer/src/dreambooth_trainer/exitcodes.py and docs/contracts.md ("Exit codes");
tests/unit/test_operator_exitcodes.py fails when the two disagree.
"""

from __future__ import annotations

from typing import Final

SUCCESS: Final = 0
INVALID_INPUT: Final = 10
"""Permanent: podFailurePolicy FailJob; the job fails with reason InvalidInput."""
RETRYABLE: Final = 11
"""Transient: counts against backoffLimit (as does any other non-zero code)."""
PREEMPTED: Final = 12
"""SIGTERM handled and checkpoint written: podFailurePolicy Ignore; counts as a preemption."""

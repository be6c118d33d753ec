"""Suspend policy: user suspend, resume, and Kueue admission."""

from __future__ import annotations

import pytest

from dreambooth_operator.policies.suspend import desired_batch_suspend, waiting_for_admission


@pytest.mark.parametrize(
    ("user", "batch", "kueue", "write", "queued"),
    [
        (False, False, False, None, False),
        (True, False, False, True, False),
        (True, True, False, None, False),
        (False, True, False, False, False),  # resume
        (False, True, True, None, True),  # Kueue has not admitted it yet: never unsuspend it ourselves
        (False, False, True, None, False),  # admitted
        (True, False, True, True, False),  # the user's suspend wins over the queue
    ],
)
def test_suspend(user: bool, batch: bool, kueue: bool, write: bool | None, queued: bool) -> None:
    assert desired_batch_suspend(user, batch, kueue) is write
    assert waiting_for_admission(user, batch, kueue) is queued

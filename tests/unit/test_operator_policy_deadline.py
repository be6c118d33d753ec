"""Deadline policy."""

from __future__ import annotations

from datetime import timedelta

from operator_wrappers import T0

from dreambooth_operator.policies.deadline import exceeded, remaining_seconds


def test_deadline() -> None:
    assert remaining_seconds(T0, None, T0) is None
    assert remaining_seconds(None, 10, T0) is None
    assert remaining_seconds(T0, 10, T0 + timedelta(seconds=4)) == 6
    assert not exceeded(T0, 10, T0 + timedelta(seconds=9))
    assert exceeded(T0, 10, T0 + timedelta(seconds=10))

"""TTL policy."""

from __future__ import annotations

from datetime import timedelta

from operator_wrappers import T0

from dreambooth_operator.policies.ttl import expired, remaining_seconds


def test_ttl() -> None:
    assert remaining_seconds(None, 5, T0) is None
    assert remaining_seconds(T0, None, T0) is None
    assert remaining_seconds(T0, 0, T0) == 0
    assert expired(T0, 0, T0)
    assert not expired(T0, 30, T0 + timedelta(seconds=29))
    assert expired(T0, 30, T0 + timedelta(seconds=31))

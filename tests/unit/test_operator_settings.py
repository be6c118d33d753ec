from __future__ import annotations

import pytest
from pydantic import ValidationError

from dreambooth_operator.settings import RANDOM_PRIORITY_MAX, OperatorSettings, peering_priority


def test_a_configured_priority_is_used_as_it_is() -> None:
    def never(a: int, b: int) -> int:
        raise AssertionError("no draw for a fixed priority")

    assert peering_priority(0, never) == 0
    assert peering_priority(50, never) == 50


def test_minus_one_draws_a_positive_priority() -> None:
    calls: list[tuple[int, int]] = []

    def draw(a: int, b: int) -> int:
        calls.append((a, b))
        return 12345

    assert peering_priority(-1, draw) == 12345
    assert calls == [(1, RANDOM_PRIORITY_MAX)]


def test_priority_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_PRIORITY", "-1")
    assert OperatorSettings().priority == -1
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_PRIORITY", "-2")
    with pytest.raises(ValidationError):
        OperatorSettings()

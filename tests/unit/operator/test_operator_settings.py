from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from pydantic import ValidationError

from dreambooth_operator.handlers import startup
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


@pytest.mark.parametrize(
    ("ours", "mandatory"),
    [
        (OperatorSettings(metrics_port=0), False),
        (OperatorSettings(metrics_port=0, peering_mandatory=True), True),
        (OperatorSettings(metrics_port=0, peering_mandatory=True, standalone=True), False),
    ],
)
def test_peering_is_mandatory_when_the_settings_say_so(
    monkeypatch: pytest.MonkeyPatch, ours: OperatorSettings, mandatory: bool
) -> None:
    """The chart sets DREAMBOOTH_OPERATOR_PEERING_MANDATORY with more than one replica: kopf then pauses without the
    peering CRD instead of acting as if alone. (kopf.operator() turns mandatory on for any peering name; the startup
    handler has the last word.)"""
    created: list[tuple[float, int, int | None]] = []

    def fake_client(timeout: float, retries: int, connections: int | None = None) -> Any:
        created.append((timeout, retries, connections))
        return SimpleNamespace(user_agent="x", close=lambda: None)

    monkeypatch.setattr(startup, "load_api_client", fake_client)
    settings = kopf.OperatorSettings()
    settings.peering.mandatory = True  # as kopf.operator(peering_name=...) leaves it
    memo = kopf.Memo(settings=ours)
    asyncio.run(startup.configure(settings=settings, memo=memo, logger=logging.getLogger("t")))
    assert settings.peering.mandatory is mandatory
    # One kept-alive API connection per thread of the reconciles' blocking calls.
    assert created == [(ours.request_timeout_seconds, ours.api_retries, ours.api_threads)]
    asyncio.run(memo["state"].poller.close())


def test_kopf_posts_only_warnings_of_its_own_as_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: kopf's INFO log lines ("Daemon 'job_loop' succeeded.") were posted as events on every job. The
    operator's own events (kopf.event, gated only by `enabled`) still go out."""
    monkeypatch.setattr(
        startup, "load_api_client", lambda *_, **__: SimpleNamespace(user_agent="x", close=lambda: None)
    )
    settings = kopf.OperatorSettings()
    memo = kopf.Memo(settings=OperatorSettings(metrics_port=0))
    asyncio.run(startup.configure(settings=settings, memo=memo, logger=logging.getLogger("t")))
    assert settings.posting.enabled is True
    assert settings.posting.level == logging.WARNING
    asyncio.run(memo["state"].poller.close())

"""`watch` rides out transient API errors; `submit` tells invalid input from conflicts and other API errors."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from dreambooth_cli import kube
from dreambooth_cli.app import main
from dreambooth_cli.client import submit_error
from dreambooth_cli.errors import ApiError, CliError, ExitStatus, InputError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def api_error(http_status: int | None) -> ApiError:
    status = ExitStatus.NO_CLUSTER if http_status is None else ExitStatus.ERROR
    if http_status == 404:
        status = ExitStatus.NOT_FOUND
    return ApiError(f"HTTP {http_status}", status, http_status)


def failing(errors: list[ApiError], result: str = "ok") -> Callable[[], str]:
    pending = list(errors)

    def fetch() -> str:
        if pending:
            raise pending.pop(0)
        return result

    return fetch


@pytest.mark.parametrize("http_status", [None, 429, 500, 503])
def test_transient_errors_are_retried_with_backoff(http_status: int | None) -> None:
    clock = FakeClock()
    retried: list[float] = []
    fetch = failing([api_error(http_status)] * 4)
    result = kube.retry_transient(
        fetch, give_up_at=clock.now + 60, on_retry=lambda _, d: retried.append(d), clock=clock, sleep=clock.sleep
    )
    assert result == "ok"
    assert clock.sleeps == retried == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize("http_status", [400, 401, 403, 404, 409])
def test_other_errors_are_raised_at_once(http_status: int) -> None:
    clock = FakeClock()
    with pytest.raises(ApiError) as err:
        kube.retry_transient(
            failing([api_error(http_status)]), give_up_at=clock.now + 60, on_retry=lambda *_: None, clock=clock
        )
    assert err.value.http_status == http_status
    assert clock.sleeps == []


def test_retries_stop_at_the_deadline_with_the_last_error() -> None:
    clock = FakeClock()
    with pytest.raises(ApiError) as err:
        kube.retry_transient(
            failing([api_error(503)] * 100),
            give_up_at=clock.now + 20,
            on_retry=lambda *_: None,
            clock=clock,
            sleep=clock.sleep,
        )
    assert err.value.http_status == 503
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0]  # the next (16 s) would end after the deadline
    assert clock.now <= 1020


def test_backoff_is_capped() -> None:
    clock = FakeClock()
    kube.retry_transient(
        failing([api_error(None)] * 8),
        give_up_at=clock.now + 3600,
        on_retry=lambda *_: None,
        clock=clock,
        sleep=clock.sleep,
    )
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def job(phase: str, step: int = 0) -> dict[str, Any]:
    return {
        "metadata": {"name": "toy"},
        "spec": {"training": {"maxSteps": 20}},
        "status": {"phase": phase, "progress": {"step": step, "totalSteps": 20}, "outputs": {"modelUri": "s3://m"}},
    }


def test_watch_rides_out_an_api_blip(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    replies: list[ApiError | dict[str, Any]] = [
        job("Running", 5),
        api_error(None),
        api_error(503),
        api_error(429),
        job("Succeeded", 20),
    ]

    def get_job(*_: Any) -> dict[str, Any]:
        reply = replies.pop(0)
        if isinstance(reply, ApiError):
            raise reply
        return reply

    clock = FakeClock()
    target = kube.Target(client.ApiClient(client.Configuration()), "ns", "https://127.0.0.1:1")
    monkeypatch.setattr(kube, "connect", lambda *_: target)
    monkeypatch.setattr(kube, "get_job", get_job)
    monkeypatch.setattr(time, "sleep", clock.sleep)
    monkeypatch.setattr(time, "monotonic", clock)
    main(["watch", "toy", "--interval", "2"])
    captured = capsys.readouterr()
    assert "toy succeeded; model: s3://m" in captured.out
    assert "toy: HTTP 503; retrying in 2s" in captured.err
    assert replies == []
    assert clock.sleeps == [2.0, 1.0, 2.0, 4.0]


def test_watch_says_when_the_trainer_evaluates(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluating = job("Running", 20)
    evaluating["status"]["progress"]["stage"] = "Evaluating"
    replies = [job("Running", 5), evaluating, evaluating, job("Succeeded", 20)]
    clock = FakeClock()
    target = kube.Target(client.ApiClient(client.Configuration()), "ns", "https://127.0.0.1:1")
    monkeypatch.setattr(kube, "connect", lambda *_: target)
    monkeypatch.setattr(kube, "get_job", lambda *_: replies.pop(0))
    monkeypatch.setattr(time, "sleep", clock.sleep)
    monkeypatch.setattr(time, "monotonic", clock)
    main(["watch", "toy", "--interval", "2"])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("toy: ")]
    assert notes == ["toy: Running", "toy: Evaluating", "toy: Succeeded"]


def test_watch_fails_at_once_when_the_job_is_gone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def get_job(*_: Any) -> dict[str, Any]:
        raise CliError("DreamBoothJob 'toy' not found in namespace 'ns'", ExitStatus.NOT_FOUND)

    clock = FakeClock()
    target = kube.Target(client.ApiClient(client.Configuration()), "ns", "https://127.0.0.1:1")
    monkeypatch.setattr(kube, "connect", lambda *_: target)
    monkeypatch.setattr(kube, "get_job", get_job)
    monkeypatch.setattr(time, "sleep", clock.sleep)
    with pytest.raises(SystemExit) as exit_:
        main(["watch", "toy"])
    assert exit_.value.code == ExitStatus.NOT_FOUND
    assert clock.sleeps == []
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: DreamBoothJob 'toy' not found")


@pytest.mark.parametrize(
    ("http_status", "expected"),
    [(400, ExitStatus.INVALID_INPUT), (422, ExitStatus.INVALID_INPUT), (409, ExitStatus.ALREADY_EXISTS)],
)
def test_submit_errors_by_status(http_status: int, expected: ExitStatus) -> None:
    err = submit_error(Path("job.yaml"), "ns/toy", api_error(http_status), dry_run=True)
    assert err.status == expected
    if expected == ExitStatus.INVALID_INPUT:
        assert isinstance(err, InputError)
        assert (
            err.message == f"job.yaml: rejected by the API server (dry run; CRD schema and rules): HTTP {http_status}"
        )
    else:
        assert err.message == "DreamBoothJob ns/toy already exists (delete it first, or change metadata.name)"


@pytest.mark.parametrize("http_status", [None, 403, 404, 429, 500, 504])
def test_other_submit_errors_are_not_invalid_input(http_status: int | None) -> None:
    original = api_error(http_status)
    err = submit_error(Path("job.yaml"), "ns/toy", original, dry_run=True)
    assert err is original
    assert err.status != ExitStatus.INVALID_INPUT

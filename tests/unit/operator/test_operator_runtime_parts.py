"""Small pure parts of the operator runtime: settings, merge patches, /progress URL, metrics, CLI flags."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web
from prometheus_client import generate_latest

from dreambooth_operator.handlers.jobs import poll_progress
from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.kube import merge_diff
from dreambooth_operator.main import parse_args
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import ProgressPoller, progress_url
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import make_job, make_pod


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_NAMESPACES", '["a","b"]')
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS", "2.5")
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_TRAINER_IMAGE", "x/trainer:1")
    settings = OperatorSettings()
    assert settings.namespaces == ["a", "b"]
    assert settings.reconcile_interval_seconds == 2.5
    assert settings.trainer_image == "x/trainer:1"
    assert settings.log_format == "json"


def test_flags_override_the_environment() -> None:
    assert parse_args(["--standalone", "-n", "a", "--namespace", "b", "--log-format", "plain"]) == {
        "standalone": True,
        "namespaces": ["a", "b"],
        "log_format": "plain",
    }
    assert parse_args([]) == {}


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"p": {"x": 1, "loss": 0.5}}, {"p": {"x": 2}}, {"p": {"x": 2, "loss": None}}),
        ({"c": [1, 2]}, {"c": [1]}, {"c": [1]}),
        ({"kopf": {"dummy": 1}}, {"a": 1}, {"a": 1}),
        (None, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ],
)
def test_merge_diff(old: dict[str, object] | None, new: dict[str, object], patch: dict[str, object]) -> None:
    assert merge_diff(old, new, keep=frozenset({"kopf"})) == patch


def test_progress_url() -> None:
    assert progress_url("127.10.0.2") == "http://127.10.0.2:8080/progress"
    assert progress_url("fd00::5", 9000) == "http://[fd00::5]:9000/progress"


def test_jobs_by_phase_gauge() -> None:
    metrics = OperatorMetrics()
    metrics.set_phase("ns", "a", "Running")
    metrics.set_phase("ns", "b", "Running")
    metrics.set_phase("ns", "a", "Succeeded")
    metrics.set_phase("ns", "c", "Failed")
    metrics.set_phase("ns", "c", None)
    text = generate_latest(metrics.registry).decode()
    assert 'dreambooth_operator_jobs{phase="Running"} 1.0' in text
    assert 'dreambooth_operator_jobs{phase="Succeeded"} 1.0' in text
    assert 'dreambooth_operator_jobs{phase="Failed"} 0.0' in text


def test_a_slow_progress_answer_does_not_hold_up_the_reconcile() -> None:
    """/progress is read in the background: the reconcile goes on with the last sample, and the late answer wakes
    the job's loop with the new one."""
    key = ("team-a", "cat")
    job = make_job().status(attempt=0, phase="Running").obj()
    pod = make_pod(job, 0, 0).running().obj()
    pod["status"]["podIP"] = "127.0.0.1"

    async def scenario() -> None:
        release = asyncio.Event()

        async def progress(_: web.Request) -> web.Response:
            await release.wait()
            return web.json_response({"step": 5, "totalSteps": 20, "stage": "Training"})

        app = web.Application()
        app.router.add_get("/progress", progress)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        poller = ProgressPoller(concurrency=1, timeout_seconds=60, interval_seconds=10, port=port)
        state = OperatorState(settings=OperatorSettings(), api=None, metrics=OperatorMetrics(), poller=poller)
        wake = state.wakes.setdefault(key, asyncio.Event())
        try:
            # Bounded only so that a regression fails instead of hanging: the answer never comes before `release`.
            first = await asyncio.wait_for(poll_progress(state, key, job, [pod], logging.getLogger("t")), 30)
            assert first is None
            assert key in state.polls
            release.set()
            await asyncio.wait_for(wake.wait(), 30)
            sample = state.samples[key]
            assert sample.document.step == 5
            assert sample.pod_uid == pod["metadata"]["uid"]
            assert key not in state.polls
        finally:
            await poller.close()
            await runner.cleanup()

    asyncio.run(scenario())

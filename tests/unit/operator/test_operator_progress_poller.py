"""Reading rank 0's /progress: a bounded read, the typed document, and a status that can always be written.

Issue 17 item 2: a /progress with a NaN loss reached the status patch, which JSON cannot carry, so every later
status write of the job failed and the job froze. These tests serve bad documents from a real HTTP server and
follow them through the operator's own poll, reconcile and status patch.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import kopf
import pytest
from aiohttp import web

from dreambooth_api.progress import MAX_PROGRESS_BYTES, ProgressError
from dreambooth_operator import kube
from dreambooth_operator.handlers.jobs import poll_progress, reconcile_job
from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod

KEY = ("team-a", "cat")
LOG = logging.getLogger("test")
Handler = Callable[[web.Request], Any]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[ProgressPoller]:
    """A /progress server on loopback, and a poller pointed at it."""
    app = web.Application()
    app.router.add_get("/progress", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    poller = ProgressPoller(concurrency=1, timeout_seconds=30, interval_seconds=10, port=port)
    try:
        yield poller
    finally:
        await poller.close()
        await runner.cleanup()


def body_handler(body: bytes) -> Handler:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return handler


async def chunked_handler(request: web.Request) -> web.StreamResponse:
    """A body with no Content-Length that never ends within the limit (8 MiB in 8 KiB chunks)."""
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    response.content_type = "application/json"
    await response.prepare(request)
    try:
        await response.write(b'{"step": 1, "pad": "')
        for _ in range(1024):
            await response.write(b"x" * 8192)
        await response.write(b'"}')
    except (ConnectionResetError, RuntimeError):
        pass  # the client stopped reading: what the test wants
    return response


def running_job() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).running(ip="127.0.0.1").obj()
    pod["status"]["podIP"] = "127.0.0.1"
    return job, make_batch_job(job).obj(), pod


def state_with(poller: ProgressPoller) -> OperatorState:
    return OperatorState(settings=OperatorSettings(), api=None, metrics=OperatorMetrics(), poller=poller)


async def poll_once(state: OperatorState, job: dict[str, Any], pod: dict[str, Any]) -> None:
    """One poll, waited for to the end (the reconcile itself waits for at most PROGRESS_WAIT_SECONDS)."""
    await poll_progress(state, KEY, job, [pod], LOG)
    task = state.polls.get(KEY)
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), 30)


def polls(state: OperatorState, result: str) -> float:
    return float(state.metrics.progress_polls.labels(result=result)._value.get())


BAD_NUMBERS = (
    b'{"phase": "Training", "step": 7, "totalSteps": 20, "loss": NaN, "lr": Infinity, "stepsPerSecond": Infinity,'
    b' "etaSeconds": -Infinity, "lastCheckpoint": {"step": 5, "uri": "s3://b/c/step-5", "time": "not a time"}}'
)
WRONG_TYPES = (
    b'{"phase": 3, "step": 7, "totalSteps": "20", "loss": "0.5", "stepsPerSecond": [2], "etaSeconds": {"s": 1},'
    b' "resumedFrom": "x", "lastCheckpoint": "s3://b/c"}'
)


@pytest.mark.parametrize("body", [BAD_NUMBERS, WRONG_TYPES], ids=["non-finite numbers", "wrong types"])
def test_a_bad_progress_document_still_gives_a_status_patch_that_json_can_carry(
    body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poll, the reconcile and the status write of the operator itself, on a document from a broken trainer."""
    patches: list[dict[str, Any]] = []

    def patch_status(api: Any, namespace: str, name: str, status: dict[str, Any], kind: str = "") -> Any:
        # What the API client would send: JSON has no NaN or Infinity (the API server rejects them).
        json.dumps(status, allow_nan=False)
        patches.append(status)
        return {"status": status}

    monkeypatch.setattr(kube, "patch_status", patch_status)
    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)
    job, batch, pod = running_job()

    async def scenario() -> None:
        async with serving(body_handler(body)) as poller:
            state = state_with(poller)
            await poll_once(state, job, pod)
            assert KEY in state.samples, "the document has a usable step: it is a sample"
            plan = await reconcile_job(state, kopf.Body(job), {KEY: [batch]}, {KEY: [pod]}, LOG)
            assert patches, "the status changed, so it was written"
            progress = plan.status.progress
            assert progress is not None
            assert progress.step == 7
            assert (progress.loss, progress.steps_per_second, progress.eta_seconds) == (None, None, None)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "body",
    [
        b'{"step": "5", "loss": 0.1}',
        b'{"step": -1}',
        b"[1, 2, 3]",
        b"not json",
        b'{"step": 1, "pad": "' + b"x" * MAX_PROGRESS_BYTES + b'"}',
    ],
    ids=["string step", "negative step", "not an object", "not json", "over the limit"],
)
def test_an_unusable_progress_document_counts_as_a_failed_poll(body: bytes) -> None:
    job, _, pod = running_job()

    async def scenario() -> None:
        async with serving(body_handler(body)) as poller:
            state = state_with(poller)
            await poll_once(state, job, pod)
            assert KEY not in state.samples
            assert (polls(state, "error"), polls(state, "ok")) == (1, 0)

    asyncio.run(scenario())


def test_a_body_over_the_limit_is_refused_without_reading_it_all() -> None:
    """By its Content-Length before reading, and without one (chunked) as soon as the limit is passed."""

    async def scenario() -> None:
        big = b'{"step": 1, "pad": "' + b"x" * (8 * MAX_PROGRESS_BYTES) + b'"}'
        for handler in (body_handler(big), chunked_handler):
            async with serving(handler) as poller:
                with pytest.raises(ProgressError, match="over"):
                    await poller.fetch(KEY, "127.0.0.1")
        async with serving(body_handler(b'{"step": 3, "totalSteps": 9}')) as poller:
            document = await poller.fetch(KEY, "127.0.0.1")
            assert (document.step, document.total_steps) == (3, 9)

    asyncio.run(scenario())

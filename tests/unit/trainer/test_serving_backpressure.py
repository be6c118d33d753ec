"""Backpressure with a slow model: a queue of 2 answers a burst with 429s carrying Retry-After and no request hangs;
a request past its deadline gets 503 and its work is dropped, as is the work of a client that went away; 200 idle
open connections do not stop a valid request."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx2
import openai
import pytest
from PIL import Image
from serving_support import PROMPT, client, config, running

from dreambooth_trainer.serving.runner import Sample, Sampling
from dreambooth_trainer.serving.server import Server

SLOW_SECONDS = 0.4


class SlowModel:
    """Stands in for the pipeline: each call takes SLOW_SECONDS and is recorded."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, sampling: Sampling, samples: Sequence[Sample], stop: Any = None) -> list[Any]:
        assert self.release.wait(60)
        time.sleep(SLOW_SECONDS)
        self.calls.append([s.seed for s in samples])
        return [Image.new("RGB", (sampling.width, sampling.height), (s.seed % 256, 0, 0)) for s in samples]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cfg = config(server={"maxQueuedRequests": 2, "maxBatchSize": 1, "maxBatchDelayMs": 0, "requestTimeoutSeconds": 3})
    with running(cfg, tmp_path_factory.mktemp("backpressure")) as srv:
        yield srv


@pytest.fixture
def slow(server: Server) -> Iterator[SlowModel]:
    model = SlowModel()
    real = server.runner.generate
    server.runner.generate = model  # type: ignore[method-assign]
    yield model
    model.release.set()
    server.runner.generate = real  # type: ignore[method-assign]


def attempt(srv: Server, seed: int) -> tuple[int, str | None]:
    """(status, Retry-After) of one request."""
    try:
        client(srv, timeout=60).images.generate(prompt=PROMPT, size="32x32", extra_body={"seed": seed})
    except openai.APIStatusError as err:
        return err.status_code, err.response.headers.get("Retry-After")
    return 200, None


def test_a_burst_gets_429_with_retry_after_and_nothing_hangs(server: Server, slow: SlowModel) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda s: attempt(server, s), range(10)))
    elapsed = time.monotonic() - started
    codes = sorted(code for code, _ in answers)
    assert 429 in codes, answers
    assert codes.count(200) >= 3, answers  # the one running and the two queued at least
    assert set(codes) <= {200, 429}, answers
    for code, retry_after in answers:
        if code == 429:
            assert retry_after is not None
            assert int(retry_after) >= 1
    assert elapsed < 30, f"the burst took {elapsed:.1f} s"
    assert server.engine.depth == 0


def test_a_request_past_its_deadline_is_503_and_its_work_dropped(server: Server, slow: SlowModel) -> None:
    slow.release.clear()  # the model is stuck: the first request holds the worker
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(attempt, server, 1)
        time.sleep(0.5)
        second = pool.submit(attempt, server, 2)
        time.sleep(3.5)  # both deadlines (3 s) pass
        slow.release.set()
        assert first.result(60)[0] == 503  # its images came after its deadline: never answered
        code, retry_after = second.result(60)
    assert code == 503
    assert retry_after is not None
    time.sleep(SLOW_SECONDS * 2)
    assert [2] not in slow.calls, "the expired request was run"


def test_work_for_a_disconnected_client_is_dropped(server: Server, slow: SlowModel) -> None:
    slow.release.clear()
    holder = threading.Thread(target=attempt, args=(server, 10))
    holder.start()
    time.sleep(0.5)
    # A client that gives up after 0.5 s (it closes the connection) while its request waits in the queue.
    with pytest.raises(openai.APITimeoutError):
        client(server, timeout=httpx2.Timeout(0.5)).images.generate(
            prompt=PROMPT, size="32x32", extra_body={"seed": 11}
        )
    time.sleep(0.5)
    slow.release.set()
    holder.join(60)
    time.sleep(SLOW_SECONDS * 2)
    assert [10] in slow.calls
    assert [11] not in slow.calls, "the abandoned request was run"


def test_200_idle_connections_do_not_stop_a_valid_request(server: Server, slow: SlowModel) -> None:
    with ExitStack() as stack:
        idle = [
            stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=30)) for _ in range(200)
        ]
        for sock in idle[:100]:
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        started = time.monotonic()
        assert attempt(server, 3) == (200, None)
        assert time.monotonic() - started < 20

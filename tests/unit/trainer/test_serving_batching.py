"""Dynamic batching on the tiny model: 16 concurrent requests run in batches larger than 1, and each image equals its
unbatched twin within the stated tolerance (per-sample generators); a request's image i equals a request of one
image with seed + i."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from serving_support import PROMPT, TOLERANCE, client, config, histogram_counts, max_diff, pixels, running

from dreambooth_trainer.serving.server import Server

PROMPTS = [PROMPT, "a red car", "a green tree on the beach", "a portrait of a man"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A long delay: all 16 requests arrive before the first batch closes, whatever the machine's load.
    cfg = config(server={"maxBatchSize": 8, "maxBatchDelayMs": 1000, "maxImagesPerRequest": 3})
    with running(cfg, tmp_path_factory.mktemp("batching")) as srv:
        yield srv


@contextmanager
def no_delay(srv: Server) -> Iterator[None]:
    """Requests sent one at a time need not wait for company."""
    delay, srv.engine.max_delay = srv.engine.max_delay, 0.0
    try:
        yield
    finally:
        srv.engine.max_delay = delay


def generate(srv: Server, prompt: str, seed: int, n: int = 1, **extra: Any) -> list[Any]:
    answer = client(srv, timeout=120).images.generate(
        prompt=prompt, n=n, size="32x32", extra_body={"seed": seed, **extra}
    )
    return [pixels(d.b64_json) for d in answer.data or []]


def test_concurrent_requests_are_batched_and_match_their_unbatched_twins(server: Server) -> None:
    before = histogram_counts("dreambooth_serve_batch_size")
    requests = [(PROMPTS[i % len(PROMPTS)], 100 + i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(lambda r: generate(server, *r)[0], requests))
    after = histogram_counts("dreambooth_serve_batch_size")
    calls = after[float("inf")] - before.get(float("inf"), 0)
    alone = after[1.0] - before.get(1.0, 0)
    assert calls < 16, f"16 requests ran in {calls} pipeline calls"
    assert alone < calls, "no batch larger than 1"
    assert after[8.0] - before.get(8.0, 0) == calls  # never more than maxBatchSize images per call

    with no_delay(server):
        for (prompt, seed), image in zip(requests, batched, strict=True):
            twin = generate(server, prompt, seed)[0]  # one at a time: a batch of 1
            assert max_diff(image, twin) <= TOLERANCE, (prompt, seed)
    # Not vacuous: different seeds and prompts give different images.
    assert max_diff(batched[0], batched[4]) > 10
    assert max_diff(batched[0], batched[1]) > 10


def test_image_i_of_a_request_is_the_seed_plus_i_image(server: Server) -> None:
    with no_delay(server):
        three = generate(server, PROMPT, 7, n=3)
        assert len(three) == 3
        for i, image in enumerate(three):
            assert max_diff(image, generate(server, PROMPT, 7 + i)[0]) <= TOLERANCE


def test_unbatched_mode_matches_too(tmp_path: Path, server: Server) -> None:
    """maxBatchSize 1 (the server's unbatched mode, the benchmark's baseline) gives the same images."""
    with running(config(server={"maxBatchSize": 1}), tmp_path) as plain, ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda s: generate(plain, PROMPT, s, negative_prompt="blurry")[0], range(4)))
    with no_delay(server):
        for seed, image in enumerate(images):
            assert max_diff(image, generate(server, PROMPT, seed, negative_prompt="blurry")[0]) <= TOLERANCE

"""The serving benchmark's load generator: keep-alive clients sending one-image requests back to back at a
concurrency level, and what the level measured (images/s, latency p50/p95) (bench_serve.py)."""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

PROMPTS = ("a photo of sks dog", "a red car in the city", "a portrait of a woman", "a green tree on the beach")


@dataclass(frozen=True)
class Size:
    """One benchmark's model size, requests and subjects."""

    name: str
    resolution: int
    steps: int
    scheduler: str
    lora_rank: int
    requests: dict[int, int]
    """Requests per concurrency level."""
    subjects: int


class Client:
    """One keep-alive connection."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=600)

    def generate(self, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        self.conn.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data}")
        return time.perf_counter() - started, data

    def close(self) -> None:
        self.conn.close()


def level(url: str, size: Size, concurrency: int, requests: int, seed0: int) -> dict[str, Any]:
    """`requests` one-image requests from `concurrency` threads, back to back."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        client = Client(url)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = request_body(size, PROMPTS[i % len(PROMPTS)], seed0 + i)
                seconds, _ = client.generate(body)
                with lock:
                    latencies.append(seconds)
        finally:
            client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": requests,
        "imagesPerSecond": round(requests / wall, 3),
        "latencyP50Seconds": round(_percentile(latencies, 50), 4),
        "latencyP95Seconds": round(_percentile(latencies, 95), 4),
        "wallSeconds": round(wall, 2),
    }


def request_body(size: Size, prompt: str, seed: int, **extra: Any) -> dict[str, Any]:
    """One image at the size's resolution and steps (`extra`: more body fields, such as `model`)."""
    return {
        "prompt": prompt,
        "size": f"{size.resolution}x{size.resolution}",
        "seed": seed,
        "num_inference_steps": size.steps,
        **extra,
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])

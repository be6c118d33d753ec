"""The serving benchmark's figures beyond the load levels: subject cold loads and warm switches (from the server's
own metrics), the largest pixel difference a batch makes, and the GPU run against the issue's targets
(bench_serve.py)."""

from __future__ import annotations

import statistics
import threading
import urllib.request
from typing import Any

from bench.serve_load import PROMPTS, Client, Size, request_body

TARGETS = {  # issue 15, one H100/H200, SD 1.5-sized, 512 px, 25 steps, fp16
    "batchedOverUnbatchedAt16": 1.5,
    "imagesPerSecondAt16": 7.0,
    "latencyAt1Seconds": 0.45,
    "warmSwitchSeconds": 0.05,
    "coldLoadSeconds": 1.0,
}


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:  # noqa: S310 - a local URL
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def _mean_delta(after: dict[str, float], before: dict[str, float], name: str) -> float | None:
    count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
    total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
    return round(total / count, 4) if count else None


def subjects_phase(url: str, size: Size, names: list[str]) -> dict[str, Any]:
    """Cold loads (first use of each subject) and warm switches (two loaded subjects, alternating)."""
    client = Client(url)
    try:
        base = [client.generate(request_body(size, PROMPTS[0], 1))[0] for _ in range(2)][-1]
        before = scrape(url)
        cold = [client.generate(request_body(size, PROMPTS[0], 1, model=name))[0] for name in names]
        mid = scrape(url)
        # The last two subjects are loaded (LRU of 2): alternate between them.
        warm = [client.generate(request_body(size, PROMPTS[0], 1, model=names[-2 + i % 2]))[0] for i in range(8)]
        after = scrape(url)
    finally:
        client.close()
    return {
        "subjects": len(names),
        "coldLoadSeconds": _mean_delta(mid, before, "dreambooth_serve_adapter_load_seconds"),
        "coldRequestSeconds": round(statistics.median(cold), 4),
        "warmSwitchSeconds": _mean_delta(after, mid, "dreambooth_serve_adapter_switch_seconds"),
        "warmRequestSeconds": round(statistics.median(warm), 4),
        "baseRequestSeconds": round(base, 4),
        "loads": after.get("dreambooth_serve_adapter_loads_total", 0)
        - before.get("dreambooth_serve_adapter_loads_total", 0),
        "evictions": after.get("dreambooth_serve_adapter_evictions_total", 0)
        - before.get("dreambooth_serve_adapter_evictions_total", 0),
    }


def batch_tolerance(url: str, size: Size) -> dict[str, Any]:
    """The largest 8-bit pixel difference between seeds' images alone and inside one batch of 16."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    def pixels(data: dict[str, Any]) -> Any:
        raw = base64.b64decode(data["data"][0]["b64_json"])
        return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)

    client = Client(url)
    alone = [pixels(client.generate(request_body(size, PROMPTS[0], 500 + i))[1]) for i in range(4)]
    client.close()
    batched: dict[int, Any] = {}

    def one(i: int) -> None:
        c = Client(url)
        batched[i] = pixels(c.generate(request_body(size, PROMPTS[0], 500 + i))[1])
        c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"maxPixelDifference": int(max(np.abs(alone[i] - batched[i]).max() for i in range(4)))}


def mean_batch_size(url: str) -> float:
    """The server's mean batch size so far (its batch-size histogram)."""
    metrics = scrape(url)
    total = metrics.get("dreambooth_serve_batch_size_sum", 0)
    return round(total / max(1.0, metrics.get("dreambooth_serve_batch_size_count", 0)), 2)


def against_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each target of `TARGETS`, the figure measured for it, and whether it is met."""
    batched = {lv["concurrency"]: lv for lv in result["modes"]["batched"]["levels"]}
    switching = result["modes"]["batched"]["subjectSwitching"]
    measured = {
        "batchedOverUnbatchedAt16": result["speedup"]["16"],
        "imagesPerSecondAt16": batched[16]["imagesPerSecond"],
        "latencyAt1Seconds": batched[1]["latencyP50Seconds"],
        "warmSwitchSeconds": switching["warmSwitchSeconds"],
        "coldLoadSeconds": switching["coldLoadSeconds"],
    }
    higher = {"batchedOverUnbatchedAt16", "imagesPerSecondAt16"}
    return {
        name: {
            "target": target,
            "measured": measured[name],
            "met": measured[name] is not None
            and (measured[name] >= target if name in higher else measured[name] <= target),
        }
        for name, target in TARGETS.items()
    }

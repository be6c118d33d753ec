"""The GPU serving benchmark's dry run (`python -m bench.bench_serve --gpu --dry-run`): the code path that
bench/device_check.sh runs on the device machine (an SD 1.5-shaped model built from configs, real server processes
in both modes, LoRA subjects, the batch tolerance and the targets), with the tiny model's sizes on the CPU, so a
broken benchmark is found here and not in a session's few minutes of GPU time. Figures are not checked, only that
every one the issue asks for is there."""

from __future__ import annotations

import math
from pathlib import Path

from bench.bench_serve import CONCURRENCY, DRY_RUN, TARGETS, run_gpu


def test_gpu_dry_run_reports_every_figure_and_target(tmp_path: Path) -> None:
    result = run_gpu(tmp_path, dry_run=True)
    assert not list(tmp_path.iterdir()), "a dry run writes no results"
    assert result["size"] == DRY_RUN.name
    assert result["device"] == "cpu"
    for mode in ("batched", "unbatched"):
        levels = result["modes"][mode]["levels"]
        assert [lv["concurrency"] for lv in levels] == list(CONCURRENCY)
        for lv in levels:
            assert lv["requests"] == DRY_RUN.requests[lv["concurrency"]]
            assert lv["imagesPerSecond"] > 0
            assert 0 < lv["latencyP50Seconds"] <= lv["latencyP95Seconds"]
    assert set(result["speedup"]) == {str(c) for c in CONCURRENCY}
    batched = result["modes"]["batched"]
    assert batched["meanBatchSize"] > 1  # 16 concurrent requests shared pipeline calls
    switching = batched["subjectSwitching"]
    assert switching["subjects"] == DRY_RUN.subjects
    assert switching["loads"] == DRY_RUN.subjects  # each subject loaded once, on first use
    assert switching["evictions"] == DRY_RUN.subjects - 2  # an LRU of two
    assert switching["coldLoadSeconds"] > 0
    assert switching["warmSwitchSeconds"] is not None
    assert switching["warmSwitchSeconds"] >= 0
    assert math.isfinite(batched["batchTolerance"]["maxPixelDifference"])
    assert set(result["targets"]) == set(TARGETS)
    for name, verdict in result["targets"].items():
        assert verdict["target"] == TARGETS[name]
        assert isinstance(verdict["met"], bool), name

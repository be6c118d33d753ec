"""The GPU training benchmark's dry run (tiny model, CPU): the same code path the device machine runs, so a broken
benchmark is found here and not in a session's few minutes of GPU time. Figures are not checked, only their shape."""

from __future__ import annotations

import math

from bench.bench_gpu_train import CASES, benchmark


def test_dry_run_measures_every_case() -> None:
    result = benchmark(dry_run=True)
    assert result["dryRun"] is True
    assert result["device"] == "cpu"
    assert set(result["cases"]) == set(CASES)
    for name, case in result["cases"].items():
        assert "error" not in case, case
        assert case["timedSteps"] >= 1
        assert case["msPerStepMin"] <= case["msPerStepMedian"] <= case["msPerStepMax"]
        assert math.isfinite(case["lossFirst"])
        assert math.isfinite(case["lossLast"])
        assert set(case["gpuMinutesPerSubject"]) == {"400", "800"}
        assert case["gpuMinutesPerSubject"]["800"] > case["gpuMinutesPerSubject"]["400"] > 0
        if case["method"] == "lora":
            assert 0 < case["trainableParameters"] < case["unetParameters"], name
        else:
            assert case["trainableParameters"] == case["unetParameters"], name

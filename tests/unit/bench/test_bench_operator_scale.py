"""The operator scale benchmark's pure parts (bench/bench_operator_scale.py): the workload, the figures it derives
from what its watches saw, and the progress changes it makes."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest

from bench.operator_scale_figures import (
    CHILD_KINDS,
    change_schedule,
    children_complete,
    job_list,
    percentiles,
    progress_document,
    reconcile_totals,
    settled,
    status_lags,
    window_figures,
)
from dreambooth_api.progress import TrainerPhase, parse_progress


def test_the_workload_is_n_named_copies_of_the_template() -> None:
    template: dict[str, Any] = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": "x"},
    }
    listed = job_list(3, "scale", template)
    assert listed["kind"] == "List"
    assert [item["metadata"]["name"] for item in listed["items"]] == ["scale-0000", "scale-0001", "scale-0002"]
    assert template["metadata"]["name"] == "x"  # copies, not the template itself
    assert all(item["kind"] == "DreamBoothJob" for item in listed["items"])


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "max": 100.0}
    assert percentiles([3.0]) == {"p50": 3.0, "p95": 3.0, "max": 3.0}
    assert percentiles([]) == {"p50": None, "p95": None, "max": None}


def test_a_job_is_complete_when_all_three_children_exist() -> None:
    children = {"Job": {"a": 1.0, "b": 2.0}, "Service": {"a": 3.0, "b": 1.5}, "ConfigMap": {"a": 0.5}}
    assert set(CHILD_KINDS) == set(children)
    assert children_complete(children, ["a", "b"]) is None  # b has no ConfigMap yet
    children["ConfigMap"]["b"] = 4.0
    assert children_complete(children, ["a", "b"]) == {"a": 3.0, "b": 4.0}


def test_each_job_changes_step_rounds_times_one_period_apart_in_time_order() -> None:
    changes = change_schedule(["a", "b", "c"], rounds=3, period=30.0, seed=1)
    assert [at for at, _, _ in changes] == sorted(at for at, _, _ in changes)
    for job in "abc":
        mine = [(at, step) for at, j, step in changes if j == job]
        assert [step for _, step in mine] == [2, 3, 4]
        assert 0.0 <= mine[0][0] < 30.0
        assert [round(b - a, 6) for (a, _), (b, _) in pairwise(mine)] == [30.0, 30.0]
    assert change_schedule(["a", "b"], 2, 30.0, seed=1) == change_schedule(["a", "b"], 2, 30.0, seed=1)


def test_a_lag_runs_from_the_change_to_the_first_status_that_shows_it() -> None:
    changes = [(10.0, "a", 2), (40.0, "a", 3), (12.0, "b", 2), (50.0, "c", 2)]
    seen = {
        "a": [(1.0, 1), (15.5, 2), (47.0, 3)],
        "b": [(2.0, 1), (11.0, 1), (30.0, 3)],  # step 2 never shown on its own: a later step counts
    }
    assert status_lags(changes, seen) == [5.5, 7.0, 18.0]  # c never showed its change: left out


def test_a_status_seen_before_the_change_does_not_count() -> None:
    assert status_lags([(10.0, "a", 2)], {"a": [(9.0, 2), (14.0, 2)]}) == [4.0]


def test_window_figures() -> None:
    figures = window_figures(60.0, 3.0, (120.0, 0.6), idle_jobs=1001)
    assert figures == {
        "jobs": 1001,
        "windowSeconds": 60.0,
        "operatorCpuSeconds": 3.0,
        "operatorCpuCores": 0.05,
        "reconcilesPerSecond": 2.0,
        "meanReconcileSeconds": 0.005,
    }
    assert window_figures(60.0, 0.0, (0.0, 0.0), 1)["meanReconcileSeconds"] is None


def test_reconcile_totals_read_the_histogram_from_metrics_text() -> None:
    text = "\n".join(
        [
            "# HELP dreambooth_operator_reconcile_duration_seconds how long",
            'dreambooth_operator_reconcile_duration_seconds_bucket{le="0.1"} 7.0',
            "dreambooth_operator_reconcile_duration_seconds_count 9.0",
            "dreambooth_operator_reconcile_duration_seconds_sum 0.25",
            "dreambooth_operator_reconcile_errors_total 2.0",
        ]
    )
    assert reconcile_totals(text) == (9.0, 0.25)
    assert reconcile_totals("") == (0.0, 0.0)


@pytest.mark.parametrize("step", [1, 7])
def test_the_fake_progress_document_is_one_the_operator_reads_as_training(step: int) -> None:
    document = parse_progress(progress_document(step))
    assert document.step == step
    assert document.phase is TrainerPhase.TRAINING
    assert document.total_steps > step


def test_the_backlog_is_drained_when_the_last_passes_were_quick_or_none_ran() -> None:
    assert not settled((100.0, 5000.0), (130.0, 5900.0), limit=0.5)  # 30 s each: queued behind others
    assert settled((100.0, 5000.0), (110.0, 5000.02), limit=0.5)
    assert settled((100.0, 5000.0), (100.0, 5000.0), limit=0.5)

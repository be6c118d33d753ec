"""The operator's labelled counters and histograms exist at zero from its start, for every label value it uses.

A child born at its first event has no earlier sample, so Prometheus's increase() and rate() never count that event:
on a real run, 4 failed jobs gave increase() 3 and 1 preemption gave 0. The label values listed here must also be
every value the code observes (the evaluation scores: every name `EvaluationResult.scores` can give)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from dreambooth_api.evaluation import EvaluationResult, JudgeScores, JudgeStatus, MetricScores
from dreambooth_operator.metrics import (
    FINAL_PHASES,
    JOB_PHASES,
    POLL_RESULTS,
    RESTART_REASONS,
    SCORE_METRICS,
    OperatorMetrics,
)

pytestmark = pytest.mark.unit


def test_every_label_value_is_exposed_at_zero_before_any_event() -> None:
    text = generate_latest(OperatorMetrics().registry).decode()
    lines = set(text.splitlines())
    for reason in RESTART_REASONS:
        assert f'dreambooth_operator_restarts_total{{reason="{reason}"}} 0.0' in lines
    for phase in FINAL_PHASES:
        assert f'dreambooth_operator_job_duration_seconds_count{{phase="{phase}"}} 0.0' in lines
        assert f'dreambooth_operator_job_gpu_seconds_count{{phase="{phase}"}} 0.0' in lines
    for metric in SCORE_METRICS:
        assert f'dreambooth_operator_evaluation_score_count{{metric="{metric}"}} 0.0' in lines
    for result in POLL_RESULTS:
        assert f'dreambooth_operator_progress_polls_total{{result="{result}"}} 0.0' in lines
    for phase in JOB_PHASES:
        assert f'dreambooth_operator_jobs{{phase="{phase}"}} 0.0' in lines


def test_the_score_labels_are_every_score_an_evaluation_reports() -> None:
    scores = MetricScores(dino=0.5, clip_i=0.5, clip_t=0.5)
    judge = JudgeScores(status=JudgeStatus.SCORED, concept_preservation=3.0, prompt_following=3.0)
    result = EvaluationResult.model_construct(trained=scores, base=scores, judge=judge)
    assert set(result.scores()) == set(SCORE_METRICS)

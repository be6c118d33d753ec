"""The dashboards' building blocks (panels, rows, variables, queries) and the metric names and phase sets their
queries share. Plain data: build.py turns it into Grafana JSON with grafana-foundation-sdk."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Phases in which a trainer pod holds its GPUs (docs/contracts.md, the /progress phases).
ACTIVE_PHASES = "Initializing|GeneratingPriors|Training|Checkpointing|Exporting|Evaluating"
# Phases in which the optimizer steps (the training-stall alert uses the same two).
STEPPING_PHASES = "Training|Checkpointing"

# The sampling server's metrics (issue 15 item 8; trainer/src/dreambooth_trainer/serving/metrics.py).
SERVE_REQUESTS = "dreambooth_serve_requests_total"  # counter, label code
SERVE_LATENCY = "dreambooth_serve_generate_seconds"  # histogram, queueing included
SERVE_IMAGES = "dreambooth_serve_images_generated_total"  # counter
SERVE_INFLIGHT = "dreambooth_serve_inflight_requests"  # gauge (the HPA's metric)
SERVE_READY = "dreambooth_serve_ready"  # gauge
SERVE_QUEUE = "dreambooth_serve_queue_depth"  # gauge
SERVE_BATCH = "dreambooth_serve_batch_size"  # histogram: images per pipeline call
SERVE_BATCH_REQUESTS = "dreambooth_serve_batch_requests"  # histogram: requests per pipeline call
SERVE_ADAPTER_LOADS = "dreambooth_serve_adapter_loads_total"  # counter
SERVE_ADAPTER_HITS = "dreambooth_serve_adapter_hits_total"  # counter
SERVE_ADAPTER_EVICTIONS = "dreambooth_serve_adapter_evictions_total"  # counter
SERVE_ADAPTER_LOAD_SECONDS = "dreambooth_serve_adapter_load_seconds"  # histogram
SERVE_GPU_MEMORY = "dreambooth_serve_gpu_memory_allocated_bytes"  # gauge
# Evaluation scores, observed by the operator when a job's evaluation ends: histogram, label metric (dino, clipI,
# clipT, conceptPreservation, promptFollowing; dreambooth_api.evaluation.EvaluationResult.scores()).
EVALUATION_SCORE = "dreambooth_operator_evaluation_score"


@dataclass(frozen=True)
class Q:
    """One PromQL target: its expression and legend."""

    expr: str
    legend: str = "__auto"
    instant: bool = False


@dataclass(frozen=True)
class P:
    """One panel: kind (timeseries, stat, bargauge), title, description, Grafana unit id, targets, width, height."""

    kind: str
    title: str
    description: str
    unit: str
    queries: Sequence[Q]
    w: int = 12
    h: int = 8
    stacked: bool = False
    show_name: bool = False
    """A stat that shows the series' name (its legend) instead of the value."""


@dataclass(frozen=True)
class Row:
    title: str
    panels: Sequence[P]


@dataclass(frozen=True)
class Variable:
    """A query variable over a label of a metric (`multi` adds All, as the regex `.*`)."""

    name: str
    label: str
    query: str
    multi: bool


@dataclass(frozen=True)
class Spec:
    name: str
    uid: str
    title: str
    description: str
    variables: Sequence[Variable]
    rows: Sequence[Row]


def hist_q(q: float, metric: str, by: str, selector: str, window: str = "$__rate_interval") -> str:
    """The q-quantile of a histogram over `window`, grouped by `by` (besides `le`)."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{window}])))"

"""The chart's Grafana dashboards, written with the typed builder of `grafana-foundation-sdk` (a dev tool: not in
the packaged chart, never an operator or trainer dependency).

`make dashboards` (this file run as a script) writes `files/dashboard-<name>.json` for the three dashboards:

- `fleet`: every job at once (jobs by phase, queue wait, running training pods, aggregate steps/s, preemptions per
  hour, failures by reason, GPU-minutes per subject, the operator's own health);
- `job`: one DreamBoothJob, templated by namespace and job (loss, learning rate, steps/s, ETA, checkpoint duration
  and size, GPU memory, restarts, evaluation scores);
- `inference`: the sampling servers (request rate, latency p50/p95/p99, batch size, queue depth, errors, adapter
  loads and hits).

`--check` writes nothing and exits 1 when a committed file differs from what this file builds (`make verify` and
tests/unit/test_chart_dashboards.py). Every panel has a unit and a description, every query names only metrics the
operator, the trainer and the sampling server export (docs/contracts.md; the unit tests compare them with the
registries), and the data source is the `datasource` variable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, stat, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueGraphMode,
    BigValueTextMode,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    StackingMode,
    TooltipDisplayMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import DashboardLinkType, DataSourceRef, VariableRefresh, VariableSort

CHART = Path(__file__).resolve().parents[1]
FILES = CHART / "files"
TAGS = ["dreambooth"]
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Phases in which a trainer pod holds its GPUs (docs/contracts.md, the /progress phases).
ACTIVE_PHASES = "Initializing|GeneratingPriors|Training|Checkpointing|Exporting"
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


# ---------------------------------------------------------------------------------------------------------------
# fleet
NS = 'namespace=~"$namespace"'
FLEET = Spec(
    name="fleet",
    uid="dreambooth-fleet",
    title="DreamBooth / Fleet",
    description="Every DreamBoothJob at once: phases, queueing, GPUs in use, throughput, restarts and failures, "
    "GPU time, and the operator's own health.",
    variables=[Variable("namespace", "Namespace", "label_values(dreambooth_trainer_step, namespace)", multi=True)],
    rows=[
        Row(
            "Jobs",
            [
                P(
                    "timeseries",
                    "Jobs by phase",
                    "DreamBoothJobs the operator knows, by phase (dreambooth_operator_jobs). Pending and Queued "
                    "jobs wait for pods or for their queue's admission; Suspended ones were preempted or suspended.",
                    "short",
                    [Q("sum by (phase) (dreambooth_operator_jobs)", "{{phase}}")],
                    w=12,
                    stacked=True,
                ),
                P(
                    "timeseries",
                    "Queue wait (creation to Running)",
                    "Time from a job's creation to its first training step, p50 and p95 over the jobs that "
                    "started in each interval: queue admission, scheduling, image pull, model download and class "
                    "images included.",
                    "s",
                    [
                        Q(hist_q(0.5, "dreambooth_operator_time_to_running_seconds", "", ""), "p50"),
                        Q(hist_q(0.95, "dreambooth_operator_time_to_running_seconds", "", ""), "p95"),
                    ],
                    w=8,
                ),
                P(
                    "stat",
                    "Jobs waiting",
                    "Jobs that are Pending (pods not running yet), Queued (waiting for their queue's admission) "
                    "or Suspended, now.",
                    "short",
                    [Q('sum(dreambooth_operator_jobs{phase=~"Pending|Queued|Suspended"})', "waiting", instant=True)],
                    w=4,
                ),
            ],
        ),
        Row(
            "GPUs and throughput",
            [
                P(
                    "timeseries",
                    "Running GPUs (training pods)",
                    "Training pods holding their GPUs (a trainer phase from Initializing to Exporting), by "
                    "namespace: the GPU count when each pod has one GPU; multiply by the GPUs per pod otherwise.",
                    "short",
                    [
                        Q(
                            f'sum by (namespace) (dreambooth_trainer_phase{{{NS}, phase=~"{ACTIVE_PHASES}"}})',
                            "{{namespace}}",
                        )
                    ],
                    w=8,
                    stacked=True,
                ),
                P(
                    "timeseries",
                    "Aggregate steps/s",
                    "Optimizer steps per second summed over the running jobs (each job counted once, not per rank).",
                    "suffix: steps/s",
                    [
                        Q(
                            f"sum(max by (namespace, job) (dreambooth_trainer_steps_per_second{{{NS}}}))",
                            "all jobs",
                        )
                    ],
                    w=8,
                ),
                P(
                    "timeseries",
                    "Training images/s",
                    "Training images per second summed over every rank of every job.",
                    "suffix: images/s",
                    [Q(f"sum by (namespace) (dreambooth_trainer_images_per_second{{{NS}}})", "{{namespace}}")],
                    w=8,
                ),
            ],
        ),
        Row(
            "Restarts and failures",
            [
                P(
                    "timeseries",
                    "Preemptions per hour",
                    "Gang restarts caused by preemption (a node reclaimed, a queue's preemption, a DisruptionTarget "
                    "condition) over the last hour. Each one loses the steps since the last checkpoint (right).",
                    "short",
                    [
                        Q(
                            'sum(increase(dreambooth_operator_restarts_total{reason="preemption"}[1h])) or '
                            "(0 * count(dreambooth_operator_reconcile_errors_total))",
                            "preemptions",
                        )
                    ],
                    w=8,
                ),
                P(
                    "timeseries",
                    "Restarts by reason, and steps redone",
                    "Training restarts per interval by reason (preemption or failure), and the optimizer steps "
                    "done again after them (work lost between a checkpoint and a kill).",
                    "short",
                    [
                        Q(
                            "sum by (reason) (increase(dreambooth_operator_restarts_total[$__rate_interval]))",
                            "{{reason}}",
                        ),
                        Q("sum(increase(dreambooth_operator_steps_redone_total[$__rate_interval]))", "steps redone"),
                    ],
                    w=8,
                ),
                P(
                    "bargauge",
                    "Failures by reason (in range)",
                    "Warning events the operator emitted in the time range, by reason: InvalidInput (bad spec or "
                    "photos), BackoffLimitExceeded, DeadlineExceeded, GpuSecondsLimitExceeded, Unschedulable, "
                    "ImagePullFailed, Preempted, ... docs/runbook.md says what to do for each.",
                    "short",
                    [
                        Q(
                            'sum by (reason) (increase(dreambooth_operator_events_total{type="Warning"}[$__range]))',
                            "{{reason}}",
                            instant=True,
                        )
                    ],
                    w=8,
                ),
                P(
                    "stat",
                    "Finished jobs (in range)",
                    "Jobs that reached Succeeded or Failed in the time range.",
                    "short",
                    [
                        Q(
                            "sum by (phase) (increase(dreambooth_operator_job_duration_seconds_count[$__range]))",
                            "{{phase}}",
                            instant=True,
                        )
                    ],
                    w=8,
                ),
                P(
                    "timeseries",
                    "Job duration (p50)",
                    "Creation to Succeeded or Failed, median over the jobs that ended in each interval.",
                    "s",
                    [Q(hist_q(0.5, "dreambooth_operator_job_duration_seconds", "phase", ""), "{{phase}}")],
                    w=16,
                ),
            ],
        ),
        Row(
            "GPU time",
            [
                P(
                    "bargauge",
                    "GPU-minutes per subject (in range)",
                    "Minutes each job's training ranks held their GPUs in the time range (the trainer's "
                    "dreambooth_trainer_active_seconds_total, summed over ranks and pods): GPU-minutes with one GPU "
                    "per rank. A subject is one DreamBoothJob.",
                    "m",
                    [
                        Q(
                            "sort_desc(sum by (namespace, job) "
                            f"(increase(dreambooth_trainer_active_seconds_total{{{NS}}}[$__range])) / 60)",
                            "{{namespace}}/{{job}}",
                            instant=True,
                        )
                    ],
                    w=12,
                    h=10,
                ),
                P(
                    "stat",
                    "GPU-minutes per finished job",
                    "From the operator's ledger (status.usage.gpuSeconds: every pod of every attempt, exact for "
                    "multi-GPU pods), over the jobs that ended in the range: the mean per succeeded job, and the "
                    "total spent on failed jobs.",
                    "m",
                    [
                        Q(
                            'sum(increase(dreambooth_operator_job_gpu_seconds_sum{phase="Succeeded"}[$__range])) / '
                            'sum(increase(dreambooth_operator_job_gpu_seconds_count{phase="Succeeded"}[$__range])) '
                            "/ 60",
                            "per succeeded job",
                            instant=True,
                        ),
                        Q(
                            'sum(increase(dreambooth_operator_job_gpu_seconds_sum{phase="Failed"}[$__range])) / 60',
                            "spent on failed jobs",
                            instant=True,
                        ),
                    ],
                    w=12,
                    h=10,
                ),
            ],
        ),
        Row(
            "Evaluation",
            [
                P(
                    "timeseries",
                    "Evaluation scores (mean of the jobs evaluated)",
                    "Mean evaluation score of the jobs whose evaluation ended in the last 6 hours, by metric: "
                    "dino, clipI, clipT (0..1) and the judge's conceptPreservation, promptFollowing (0..4). "
                    "The alert DreamBoothEvaluationScoreLow uses the same means.",
                    "none",
                    [
                        Q(
                            f"sum by (metric) (increase({EVALUATION_SCORE}_sum[6h])) / "
                            f"sum by (metric) (increase({EVALUATION_SCORE}_count[6h]))",
                            "{{metric}}",
                        )
                    ],
                    w=24,
                ),
            ],
        ),
        Row(
            "Operator",
            [
                P(
                    "stat",
                    "Operator replicas scraped",
                    "Operator processes Prometheus scrapes (one active, the others standing by with peering). "
                    "0 or no value: the operator is down or not scraped (alert DreamBoothOperatorDown).",
                    "short",
                    [Q("count(dreambooth_operator_reconcile_errors_total)", "replicas", instant=True)],
                    w=4,
                ),
                P(
                    "timeseries",
                    "Reconcile errors",
                    "Reconciles that raised an error, per second (API server trouble, RBAC, a bug).",
                    "ops",
                    [Q("sum(rate(dreambooth_operator_reconcile_errors_total[$__rate_interval]))", "errors")],
                    w=6,
                ),
                P(
                    "timeseries",
                    "Reconcile duration",
                    "Time of one reconcile of a DreamBoothJob (observe, decide, act, write status), p50 and p99.",
                    "s",
                    [
                        Q(hist_q(0.5, "dreambooth_operator_reconcile_duration_seconds", "", ""), "p50"),
                        Q(hist_q(0.99, "dreambooth_operator_reconcile_duration_seconds", "", ""), "p99"),
                    ],
                    w=7,
                ),
                P(
                    "timeseries",
                    "Progress polls and stale reads",
                    "Reads of rank 0's /progress by result, and reconciles that re-read an object older than the "
                    "operator's own last status write, per second.",
                    "ops",
                    [
                        Q(
                            "sum by (result) (rate(dreambooth_operator_progress_polls_total[$__rate_interval]))",
                            "poll {{result}}",
                        ),
                        Q("sum(rate(dreambooth_operator_stale_reads_total[$__rate_interval]))", "stale reads"),
                    ],
                    w=7,
                ),
            ],
        ),
    ],
)

# ---------------------------------------------------------------------------------------------------------------
# job
SEL = 'namespace="$namespace", job="$job"'
R0 = f'{SEL}, rank="0"'
JOB = Spec(
    name="job",
    uid="dreambooth-job",
    title="DreamBooth / Job",
    description="One DreamBoothJob: progress, loss and learning rate, speed and ETA, checkpoints, GPU memory, "
    "restarts and evaluation.",
    variables=[
        Variable("namespace", "Namespace", "label_values(dreambooth_trainer_step, namespace)", multi=False),
        Variable("job", "Job", 'label_values(dreambooth_trainer_step{namespace="$namespace"}, job)', multi=False),
    ],
    rows=[
        Row(
            "Progress",
            [
                P(
                    "stat",
                    "Progress",
                    "Optimizer steps done of those planned (rank 0).",
                    "percentunit",
                    [
                        Q(
                            f"max(dreambooth_trainer_step{{{R0}}}) / max(dreambooth_trainer_total_steps{{{R0}}})",
                            "progress",
                            instant=True,
                        )
                    ],
                    w=6,
                    h=6,
                ),
                P(
                    "stat",
                    "Phase",
                    "The trainer's current phase (rank 0): Initializing, GeneratingPriors, Training, "
                    "Checkpointing, Exporting, then Succeeded, Failed or Preempted.",
                    "none",
                    [Q(f"max by (phase) (dreambooth_trainer_phase{{{R0}}}) > 0", "{{phase}}", instant=True)],
                    w=6,
                    h=6,
                    show_name=True,
                ),
                P(
                    "stat",
                    "ETA",
                    "Time to the last step at the current speed: (planned - done) / steps per second.",
                    "s",
                    [
                        Q(
                            f"(max(dreambooth_trainer_total_steps{{{R0}}}) - max(dreambooth_trainer_step{{{R0}}})) "
                            f"/ (max(dreambooth_trainer_steps_per_second{{{R0}}}) > 0)",
                            "ETA",
                            instant=True,
                        )
                    ],
                    w=6,
                    h=6,
                ),
                P(
                    "stat",
                    "Restarts (trainer processes in range)",
                    "Trainer processes of rank 0 seen in the time range, less one: each gang restart (preemption "
                    "or failure) starts a new pod. `kubectl describe dbj` lists them by reason.",
                    "short",
                    [
                        Q(
                            f"count(count_over_time(dreambooth_trainer_step{{{R0}}}[$__range])) - 1",
                            "restarts",
                            instant=True,
                        )
                    ],
                    w=6,
                    h=6,
                ),
            ],
        ),
        Row(
            "Training",
            [
                P(
                    "timeseries",
                    "Loss",
                    "Training loss of the last step (rank 0, mean over its micro-batches).",
                    "none",
                    [Q(f"max(dreambooth_trainer_loss{{{R0}}})", "loss")],
                ),
                P(
                    "timeseries",
                    "Learning rate",
                    "Learning rate of the last step (first parameter group).",
                    "sci",
                    [Q(f"max(dreambooth_trainer_learning_rate{{{R0}}})", "lr")],
                ),
                P(
                    "timeseries",
                    "Steps/s and images/s",
                    "Optimizer steps per second (rank 0) and training images per second by rank, over the last "
                    "20 steps.",
                    "ops",
                    [
                        Q(f"max(dreambooth_trainer_steps_per_second{{{R0}}})", "steps/s"),
                        Q(f"max by (rank) (dreambooth_trainer_images_per_second{{{SEL}}})", "images/s rank {{rank}}"),
                    ],
                ),
                P(
                    "timeseries",
                    "Data wait",
                    "Fraction of time each rank's loop waited for its next batch (1 = always waiting).",
                    "percentunit",
                    [
                        Q(
                            f"max by (rank) (rate(dreambooth_trainer_data_wait_seconds_total{{{SEL}}}"
                            "[$__rate_interval]))",
                            "rank {{rank}}",
                        )
                    ],
                ),
            ],
        ),
        Row(
            "Checkpoints",
            [
                P(
                    "timeseries",
                    "Checkpoint duration",
                    "Serialize and upload time per checkpoint (in the background), and the time the training loop "
                    "was blocked by it, p95 over the last 30 minutes.",
                    "s",
                    [
                        Q(hist_q(0.95, "dreambooth_trainer_checkpoint_upload_seconds", "", SEL, "30m"), "upload p95"),
                        Q(hist_q(0.95, "dreambooth_trainer_checkpoint_stall_seconds", "", SEL, "30m"), "stall p95"),
                    ],
                    w=8,
                ),
                P(
                    "timeseries",
                    "Checkpoint size",
                    "Size of the newest complete checkpoint.",
                    "bytes",
                    [Q(f"max(dreambooth_trainer_checkpoint_last_bytes{{{R0}}})", "last checkpoint")],
                    w=8,
                ),
                P(
                    "timeseries",
                    "Checkpoints: last step, written, failed",
                    "Step of the newest complete checkpoint, checkpoints written and uploads failed (this trainer "
                    "process).",
                    "short",
                    [
                        Q(f"max(dreambooth_trainer_last_checkpoint_step{{{R0}}})", "last checkpoint step"),
                        Q(f"max(dreambooth_trainer_checkpoints_total{{{R0}}})", "written"),
                        Q(f"max(dreambooth_trainer_checkpoint_upload_failures_total{{{R0}}})", "failed"),
                    ],
                    w=8,
                ),
            ],
        ),
        Row(
            "GPU and evaluation",
            [
                P(
                    "timeseries",
                    "GPU memory",
                    "CUDA memory reserved by the caching allocator and allocated by tensors, by rank (0 on CPU).",
                    "bytes",
                    [
                        Q(
                            f"max by (rank) (dreambooth_trainer_gpu_memory_reserved_bytes{{{SEL}}})",
                            "reserved {{rank}}",
                        ),
                        Q(
                            f"max by (rank) (dreambooth_trainer_gpu_memory_allocated_bytes{{{SEL}}})",
                            "allocated {{rank}}",
                        ),
                    ],
                ),
                P(
                    "bargauge",
                    "Evaluation scores (jobs evaluated in range)",
                    "Mean evaluation score by metric over the jobs whose evaluation ended in the time range (dino, "
                    "clipI, clipT: 0..1; conceptPreservation, promptFollowing: 0..4). This job's own scores are in "
                    "its status: kubectl get dbj $job -n $namespace -o jsonpath='{.status.outputs.evaluation}'.",
                    "none",
                    [
                        Q(
                            f"sum by (metric) (increase({EVALUATION_SCORE}_sum[$__range])) / "
                            f"sum by (metric) (increase({EVALUATION_SCORE}_count[$__range]))",
                            "{{metric}}",
                            instant=True,
                        )
                    ],
                ),
            ],
        ),
    ],
)

# ---------------------------------------------------------------------------------------------------------------
# inference
SRV = 'namespace=~"$namespace", pod=~"$pod"'
INFERENCE = Spec(
    name="inference",
    uid="dreambooth-inference",
    title="DreamBooth / Inference",
    description="The sampling servers of InferenceServices: traffic, latency, batching, queueing, errors, subject "
    "(LoRA adapter) loads and hits, GPU memory.",
    variables=[
        Variable("namespace", "Namespace", f"label_values({SERVE_READY}, namespace)", multi=True),
        Variable("pod", "Pod", f'label_values({SERVE_READY}{{namespace=~"$namespace"}}, pod)', multi=True),
    ],
    rows=[
        Row(
            "Traffic",
            [
                P(
                    "timeseries",
                    "Request rate by code",
                    "Generate requests per second by HTTP status code (200 ok, 400 out of limits, 401, 413, 429 "
                    "queue full, 500 generation failed, 503 loading, draining or out of GPU memory).",
                    "reqps",
                    [Q(f"sum by (code) (rate({SERVE_REQUESTS}{{{SRV}}}[$__rate_interval]))", "{{code}}")],
                    stacked=True,
                ),
                P(
                    "timeseries",
                    "Latency p50, p95, p99",
                    "Time to answer a generate request, queueing included.",
                    "s",
                    [
                        Q(hist_q(0.5, SERVE_LATENCY, "", SRV), "p50"),
                        Q(hist_q(0.95, SERVE_LATENCY, "", SRV), "p95"),
                        Q(hist_q(0.99, SERVE_LATENCY, "", SRV), "p99"),
                    ],
                ),
                P(
                    "timeseries",
                    "Errors",
                    "Share of requests answered with a 5xx (the alert DreamBoothServingErrors fires over 5%), and "
                    "429s (queue full: backpressure, scale out).",
                    "percentunit",
                    [
                        Q(
                            f'(sum(rate({SERVE_REQUESTS}{{{SRV}, code=~"5.."}}[$__rate_interval])) or vector(0)) / '
                            f"sum(rate({SERVE_REQUESTS}{{{SRV}}}[$__rate_interval]))",
                            "5xx",
                        ),
                        Q(
                            f'(sum(rate({SERVE_REQUESTS}{{{SRV}, code="429"}}[$__rate_interval])) or vector(0)) / '
                            f"sum(rate({SERVE_REQUESTS}{{{SRV}}}[$__rate_interval]))",
                            "429",
                        ),
                    ],
                ),
                P(
                    "timeseries",
                    "Images generated",
                    "Images generated per second.",
                    "suffix: images/s",
                    [Q(f"sum(rate({SERVE_IMAGES}{{{SRV}}}[$__rate_interval]))", "images/s")],
                ),
            ],
        ),
        Row(
            "Batching and queueing",
            [
                P(
                    "timeseries",
                    "Batch size",
                    "Dynamic batching: images per pipeline call (mean and p95) and requests per pipeline call "
                    "(mean). Concurrent compatible requests share a call up to spec.server.maxBatchSize.",
                    "short",
                    [
                        Q(
                            f"sum(rate({SERVE_BATCH}_sum{{{SRV}}}[$__rate_interval])) / "
                            f"sum(rate({SERVE_BATCH}_count{{{SRV}}}[$__rate_interval]))",
                            "images per call (mean)",
                        ),
                        Q(hist_q(0.95, SERVE_BATCH, "", SRV), "images per call (p95)"),
                        Q(
                            f"sum(rate({SERVE_BATCH_REQUESTS}_sum{{{SRV}}}[$__rate_interval])) / "
                            f"sum(rate({SERVE_BATCH_REQUESTS}_count{{{SRV}}}[$__rate_interval]))",
                            "requests per call (mean)",
                        ),
                    ],
                    w=8,
                ),
                P(
                    "timeseries",
                    "Queue depth and in flight",
                    "Requests waiting in each pod's queue, and requests being answered or waiting (the gauge the "
                    "HorizontalPodAutoscaler reads).",
                    "short",
                    [
                        Q(f"sum by (pod) ({SERVE_QUEUE}{{{SRV}}})", "queued {{pod}}"),
                        Q(f"sum by (pod) ({SERVE_INFLIGHT}{{{SRV}}})", "in flight {{pod}}"),
                    ],
                    w=8,
                ),
                P(
                    "stat",
                    "Ready replicas",
                    "Serving pods with their model loaded and answering.",
                    "short",
                    [Q(f"sum({SERVE_READY}{{{SRV}}})", "ready", instant=True)],
                    w=8,
                ),
            ],
        ),
        Row(
            "Subjects (adapters) and GPU",
            [
                P(
                    "timeseries",
                    "Adapter loads, hits, evictions",
                    "LoRA subjects loaded from object storage (cold loads), batches whose subject was already "
                    "loaded (hits) and subjects evicted from the LRU, per second.",
                    "ops",
                    [
                        Q(f"sum(rate({SERVE_ADAPTER_LOADS}{{{SRV}}}[$__rate_interval]))", "loads"),
                        Q(f"sum(rate({SERVE_ADAPTER_HITS}{{{SRV}}}[$__rate_interval]))", "hits"),
                        Q(f"sum(rate({SERVE_ADAPTER_EVICTIONS}{{{SRV}}}[$__rate_interval]))", "evictions"),
                    ],
                    w=6,
                ),
                P(
                    "timeseries",
                    "Adapter hit ratio",
                    "Batches whose subject was already loaded, of the batches plus cold loads.",
                    "percentunit",
                    [
                        Q(
                            f"sum(rate({SERVE_ADAPTER_HITS}{{{SRV}}}[$__rate_interval])) / "
                            f"(sum(rate({SERVE_ADAPTER_HITS}{{{SRV}}}[$__rate_interval])) + "
                            f"sum(rate({SERVE_ADAPTER_LOADS}{{{SRV}}}[$__rate_interval])))",
                            "hit ratio",
                        )
                    ],
                    w=6,
                ),
                P(
                    "timeseries",
                    "Adapter load time",
                    "Time to load one subject (download and apply), p50 and p95.",
                    "s",
                    [
                        Q(hist_q(0.5, SERVE_ADAPTER_LOAD_SECONDS, "", SRV), "p50"),
                        Q(hist_q(0.95, SERVE_ADAPTER_LOAD_SECONDS, "", SRV), "p95"),
                    ],
                    w=6,
                ),
                P(
                    "timeseries",
                    "GPU memory",
                    "CUDA memory allocated by each serving pod (0 on CPU).",
                    "bytes",
                    [Q(f"max by (pod) ({SERVE_GPU_MEMORY}{{{SRV}}})", "{{pod}}")],
                    w=6,
                ),
            ],
        ),
    ],
)

SPECS = (FLEET, JOB, INFERENCE)

PanelBuilder = timeseries.Panel | stat.Panel | bargauge.Panel


def _panel(spec: P, panel_id: int) -> PanelBuilder:
    builder: PanelBuilder
    if spec.kind == "timeseries":
        ts = (
            timeseries.Panel()
            .legend(
                cb.VizLegendOptions()
                .show_legend(True)
                .display_mode(LegendDisplayMode.LIST)
                .placement(LegendPlacement.BOTTOM)
            )
            .tooltip(cb.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING))
            .fill_opacity(10)
        )
        if spec.stacked:
            ts = ts.stacking(cb.StackingConfig().mode(StackingMode.NORMAL))
        builder = ts
    elif spec.kind == "stat":
        builder = (
            stat.Panel()
            .graph_mode(BigValueGraphMode.NONE)
            .text_mode(BigValueTextMode.NAME if spec.show_name else BigValueTextMode.AUTO)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
    elif spec.kind == "bargauge":
        builder = (
            bargauge.Panel()
            .orientation(VizOrientation.HORIZONTAL)
            .display_mode(BarGaugeDisplayMode.GRADIENT)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
    else:
        raise ValueError(f"unknown panel kind {spec.kind!r}")
    builder = (
        builder.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .unit(spec.unit)
        .datasource(DATASOURCE)
        .span(spec.w)
        .height(spec.h)
    )
    for index, q in enumerate(spec.queries):
        target = prom.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(chr(ord("A") + index))
        target = target.datasource(DATASOURCE)
        builder = builder.with_target(target.instant() if q.instant else target.range())
    return builder


def build(spec: Spec) -> dict[str, Any]:
    """The dashboard as the JSON document Grafana imports."""
    dashboard = (
        db.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(TAGS)
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .link(
            db.DashboardLink("DreamBooth")
            .type(DashboardLinkType.DASHBOARDS)
            .tags(TAGS)
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for var in spec.variables:
        variable = (
            db.QueryVariable(var.name)
            .label(var.label)
            .datasource(DATASOURCE)
            .query(var.query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
        )
        if var.multi:
            variable = variable.multi(True).include_all(True).all_value(".*")
        dashboard = dashboard.with_variable(variable)
    panel_id = 0
    for row in spec.rows:
        panel_id += 1
        dashboard = dashboard.with_row(db.Row(row.title).id(panel_id))
        for panel in row.panels:
            panel_id += 1
            dashboard = dashboard.with_panel(_panel(panel, panel_id))
    document: dict[str, Any] = json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))
    return document


def render(spec: Spec) -> str:
    """The committed file's text: sorted keys, two-space indent, a final newline."""
    return json.dumps(build(spec), indent=2, sort_keys=True) + "\n"


def path(spec: Spec) -> Path:
    return FILES / f"dashboard-{spec.name}.json"


def _shown(target: Path) -> Path:
    root = CHART.parents[1]
    return target.relative_to(root) if target.is_relative_to(root) else target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs")
    args = parser.parse_args(argv)
    stale = []
    for spec in SPECS:
        text = render(spec)
        target = path(spec)
        if target.exists() and target.read_text() == text:
            continue
        if args.check:
            stale.append(target)
        else:
            target.write_text(text)
            print(f"wrote {_shown(target)}")
    for target in stale:
        print(f"{_shown(target)} differs from dashboards/build.py: run make dashboards")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

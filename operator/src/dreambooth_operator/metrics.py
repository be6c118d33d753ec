"""The operator's own Prometheus metrics (prefix ``dreambooth_operator_``), on its own port and registry."""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dreambooth_api.constants import JobPhase

# Buckets for minutes-to-hours durations (time to Running and job duration).
DURATION_BUCKETS: Final = (5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)

# Buckets for GPU-seconds per job: a few GPU-minutes (a LoRA on one GPU) to GPU-days (large full fine-tunes).
GPU_SECONDS_BUCKETS: Final = (60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 14400, 28800, 86400, 259200)

# Buckets for evaluation scores: cosine similarities (dino, clipI, clipT: 0 to 1 in practice) and the judge's means
# (conceptPreservation, promptFollowing: 0 to 4).
SCORE_BUCKETS: Final = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


# The label values of the labelled counters and histograms, created at zero when the operator starts. A child born
# at its first event has no earlier sample, so Prometheus's increase() and rate() never count that event: after each
# operator start the first failure, preemption or score would be missing from the dashboards and alerts (a real run
# showed increase() of 3 for 4 failures and 0 for 1 preemption).
JOB_PHASES: Final = tuple(phase.value for phase in JobPhase)
FINAL_PHASES: Final = (JobPhase.SUCCEEDED.value, JobPhase.FAILED.value)
RESTART_REASONS: Final = ("preemption", "failure")
POLL_RESULTS: Final = ("ok", "error")
SCORE_METRICS: Final = (
    "dino",
    "clipI",
    "clipT",
    "baseDino",
    "baseClipI",
    "baseClipT",
    "conceptPreservation",
    "promptFollowing",
)


class OperatorMetrics:
    """All metrics of one operator process (a fresh registry each, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge(
            "dreambooth_operator_jobs", "DreamBoothJobs known to this operator, by phase", ["phase"], registry=r
        )
        self.reconcile_duration = Histogram(
            "dreambooth_operator_reconcile_duration_seconds",
            "Time of one reconcile of a DreamBoothJob (observe, decide, act, write status)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.reconcile_errors = Counter(
            "dreambooth_operator_reconcile_errors_total", "Reconciles that raised an error", registry=r
        )
        self.stale_reads = Counter(
            "dreambooth_operator_stale_reads_total",
            "Reconciles whose watched DreamBoothJob predated the operator's own last status write (re-read)",
            registry=r,
        )
        self.restarts = Counter(
            "dreambooth_operator_restarts_total",
            "Training restarts, by reason (preemption or failure)",
            ["reason"],
            registry=r,
        )
        self.steps_redone = Counter(
            "dreambooth_operator_steps_redone_total",
            "Training steps done again after restarts (lost work: past the checkpoint a restarted pod resumed from)",
            registry=r,
        )
        self.time_to_running = Histogram(
            "dreambooth_operator_time_to_running_seconds",
            "From a DreamBoothJob's creation to its first training step (phase Running)",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.job_duration = Histogram(
            "dreambooth_operator_job_duration_seconds",
            "From a DreamBoothJob's creation to Succeeded or Failed, by final phase",
            ["phase"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.job_gpu_seconds = Histogram(
            "dreambooth_operator_job_gpu_seconds",
            "GPU-seconds a DreamBoothJob used (status.usage.gpuSeconds: all pods, all attempts), observed when it "
            "ends, by final phase",
            ["phase"],
            buckets=GPU_SECONDS_BUCKETS,
            registry=r,
        )
        self.evaluation_score = Histogram(
            "dreambooth_operator_evaluation_score",
            "Evaluation scores of succeeded DreamBoothJobs (status.outputs.evaluation), observed once when the job "
            "succeeds, by metric (dino, clipI, clipT, baseDino, baseClipI, baseClipT, conceptPreservation, "
            "promptFollowing)",
            ["metric"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.progress_polls = Counter(
            "dreambooth_operator_progress_polls_total",
            "Reads of rank 0's /progress, by result (ok or error)",
            ["result"],
            registry=r,
        )
        self.events = Counter(
            "dreambooth_operator_events_total",
            "Kubernetes Events emitted, by type and reason",
            ["type", "reason"],
            registry=r,
        )
        self._phases: dict[tuple[str, str], str] = {}
        for known in JOB_PHASES:
            self.jobs.labels(phase=known).set(0)
        for reason in RESTART_REASONS:
            self.restarts.labels(reason=reason)
        for final in FINAL_PHASES:
            self.job_duration.labels(phase=final)
            self.job_gpu_seconds.labels(phase=final)
        for metric in SCORE_METRICS:
            self.evaluation_score.labels(metric=metric)
        for result in POLL_RESULTS:
            self.progress_polls.labels(result=result)

    def set_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a job's phase (None forgets the job) and refresh the jobs-by-phase gauge."""
        key = (namespace, name)
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        counts = Tally(self._phases.values())
        for known in JOB_PHASES:
            self.jobs.labels(phase=known).set(counts.get(known, 0))

    def observe_evaluation(self, scores: Mapping[str, float] | None) -> None:
        """Observe a succeeded job's evaluation scores (finite ones; the metric names the status uses)."""
        for metric, value in (scores or {}).items():
            if math.isfinite(value):
                self.evaluation_score.labels(metric=metric).observe(value)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from other pods
        """Serve /metrics in a background thread."""
        start_http_server(port, addr=address, registry=self.registry)

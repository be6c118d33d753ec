"""The fleet dashboard: every job at once."""

from __future__ import annotations

from dash_model import ACTIVE_PHASES, EVALUATION_SCORE, P, Q, Row, Spec, Variable, hist_q

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
                    "Training pods holding their GPUs (a trainer phase from Initializing to Evaluating), by "
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

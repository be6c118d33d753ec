"""The job dashboard: one DreamBoothJob, templated by namespace and job."""

from __future__ import annotations

from dash_model import EVALUATION_SCORE, P, Q, Row, Spec, Variable, hist_q

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
                    "Checkpointing, Exporting, Evaluating, then Succeeded, Failed or Preempted.",
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

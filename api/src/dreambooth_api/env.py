"""Environment variables and ports between the operator (or `dreambooth run --local`) and the trainer image.

docs/contracts.md ("Environment") describes each one; the operator sets them on the pods it builds and the trainer
and the sampling server read them. Nothing else spells these names.
"""

from __future__ import annotations

from typing import Final

# Training pods.
CONFIG: Final = "DREAMBOOTH_CONFIG"
"""Path of the JobConfig JSON (the job's ConfigMap key `config.json`, mounted)."""
WORKDIR: Final = "DREAMBOOTH_WORKDIR"
"""Scratch directory for downloads and staging."""
ATTEMPT: Final = "DREAMBOOTH_ATTEMPT"
"""The operator's attempt number (a new gang after a restart gets the next one)."""
BIND_ADDRESS: Final = "DREAMBOOTH_BIND_ADDRESS"
"""Address the progress/metrics (or serving) server binds; the pod IP from `fieldRef: status.podIP`."""
METRICS_PORT: Final = "DREAMBOOTH_METRICS_PORT"
"""Port of the trainer's `/metrics`, `/progress`, `/healthz`."""
GRACE_SECONDS: Final = "DREAMBOOTH_GRACE_SECONDS"
"""Seconds between SIGTERM and SIGKILL that the trainer may use for its last checkpoint."""
MODEL_CACHE_DIR: Final = "DREAMBOOTH_MODEL_CACHE_DIR"
"""A shared volume for base models and compile caches (optional)."""
LOG_INTERVAL_SECONDS: Final = "DREAMBOOTH_LOG_INTERVAL_SECONDS"
"""Seconds between two `step` log lines."""
VLM_API_KEY: Final = "DREAMBOOTH_VLM_API_KEY"
"""The VLM endpoint's API key (`spec.vlm.credentialsSecret`, through secretKeyRef; never in the ConfigMap)."""

# Sampling server pods.
SERVE_CONFIG: Final = "DREAMBOOTH_SERVE_CONFIG"
"""The serving config JSON (InferenceService spec.model and limits)."""
SERVE_PORT: Final = "DREAMBOOTH_SERVE_PORT"
"""Port of the sampling server."""
SERVE_TOKEN: Final = "DREAMBOOTH_SERVE_TOKEN"  # noqa: S105 - the name of a variable, not a secret
"""Bearer token the sampling server requires (from the InferenceService's auth Secret)."""

# Distributed training (torchrun's names, and the ones Lightning reads).
PET_NNODES: Final = "PET_NNODES"
PET_NPROC_PER_NODE: Final = "PET_NPROC_PER_NODE"
PET_NODE_RANK: Final = "PET_NODE_RANK"
PET_MASTER_ADDR: Final = "PET_MASTER_ADDR"
PET_MASTER_PORT: Final = "PET_MASTER_PORT"
MASTER_ADDR: Final = "MASTER_ADDR"
MASTER_PORT: Final = "MASTER_PORT"
WORLD_SIZE: Final = "WORLD_SIZE"
NODE_RANK: Final = "NODE_RANK"

# Object-storage credentials (botocore's names; values come from the job's Secret through secretKeyRef).
AWS_ACCESS_KEY_ID: Final = "AWS_ACCESS_KEY_ID"
AWS_SECRET_ACCESS_KEY: Final = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 - the name of a variable, not a secret
AWS_SESSION_TOKEN: Final = "AWS_SESSION_TOKEN"  # noqa: S105 - the name of a variable, not a secret

# Ports.
TRAINER_METRICS_PORT: Final = 8080
"""The trainer's progress/metrics port (container port name `metrics`)."""
TRAINER_MASTER_PORT: Final = 29500
"""The rendezvous port of rank 0 (PET_MASTER_PORT)."""
SERVE_DEFAULT_PORT: Final = 8080
"""The sampling server's port (container port name `http`)."""

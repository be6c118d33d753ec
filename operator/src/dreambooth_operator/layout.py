"""The layout of the pods the operator builds: names that the builders write and its readers (podstate,
validation) read back. Operator-only; what the trainer also reads (env names, ports) is in `dreambooth_api.env`.
"""

from __future__ import annotations

from typing import Final

from dreambooth_api import env

CONTAINER_NAME: Final = "trainer"
"""The training container (the podFailurePolicy's exit-code rules and the pod readers name it)."""
COMPLETION_INDEX_ANNOTATION: Final = "batch.kubernetes.io/job-completion-index"
# The Job controller labels (and annotates) each pod with its completion index: this is the rank label.
RANK_LABEL: Final = COMPLETION_INDEX_ANNOTATION
SHM_VOLUME: Final = "dshm"
FIELD_MANAGER: Final = "dreambooth-operator"
"""The server-side-apply field manager of everything the operator writes."""
METRICS_PORT_NAME: Final = "metrics"
MASTER_PORT_NAME: Final = "rendezvous"
MODEL_CACHE_VOLUME: Final = "model-cache"
MODEL_CACHE_MOUNT: Final = "/var/cache/dreambooth"
"""Where training and serving pods mount the shared base-model cache (settings.model_cache_volume)."""

# The names Lightning and torch.distributed's env:// rendezvous read, set next to torchrun's PET_* (env.py).
RESERVED_ENV: Final = frozenset(
    {
        env.CONFIG,
        env.ATTEMPT,
        env.BIND_ADDRESS,
        env.METRICS_PORT,
        env.GRACE_SECONDS,
        env.PET_NNODES,
        env.PET_NPROC_PER_NODE,
        env.PET_NODE_RANK,
        env.PET_MASTER_ADDR,
        env.PET_MASTER_PORT,
        env.MASTER_ADDR,
        env.MASTER_PORT,
        env.WORLD_SIZE,
        env.NODE_RANK,
    }
)
"""Env names the operator sets on training pods; spec.podTemplate.env may not set them (validation.py)."""

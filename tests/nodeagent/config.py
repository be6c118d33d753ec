"""The agent's settings (JSON-serialisable, so the fixture can hand them to the agent process)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The product's images, mapped to what their Dockerfiles' ENTRYPOINT runs (images/*/Dockerfile), found on the
# agent's PATH (the venv's console scripts): a pod from the Helm chart, which gives the operator container no
# `command`, runs the local venv's operator. Kept to these two on purpose; tests add their own through the setting.
PRODUCT_IMAGE_ENTRYPOINTS: dict[str, list[str]] = {
    "ghcr.io/dreambooth-operator/operator": ["dreambooth-operator"],
    "ghcr.io/dreambooth-operator/trainer": ["dreambooth-train"],
}

HOST_ENV_KEYS = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "VIRTUAL_ENV")


@dataclass
class AgentConfig:
    kubeconfig: str
    state_dir: str
    nodes: list[str] = field(default_factory=lambda: [f"gpu-node-{i}" for i in range(3)])
    capacity: dict[str, str] = field(
        default_factory=lambda: {
            "cpu": "16",
            "memory": "64Gi",
            "pods": "110",
            "ephemeral-storage": "100Gi",
            "nvidia.com/gpu": "2",
        }
    )
    labels: dict[str, str] = field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "FAKE-TEST-GPU"}
    )
    taints: list[dict[str, str]] = field(default_factory=list)
    heartbeat_seconds: float = 5.0
    lease_duration_seconds: int = 40
    # "" hides every GPU from the pods (the default here); None passes the host's value through.
    cuda_visible_devices: str | None = ""
    # Threads per pod process for OpenMP/torch (None: the library default, one per core). This machine is small and
    # shared, and torch oversubscribes it badly (tiny-model steps run ~30x slower); torchrun sets 1 per worker too.
    # The pod's own env wins.
    omp_num_threads: str | None = "1"
    extra_env: dict[str, str] = field(default_factory=dict)
    host_env_keys: list[str] = field(default_factory=lambda: list(HOST_ENV_KEYS))
    # Images have no filesystem here; a container without `command` runs its image's entrypoint from this map
    # (an image name without tag or digest matches every tag). Replaces the default map when set.
    image_entrypoints: dict[str, list[str]] = field(default_factory=lambda: dict(PRODUCT_IMAGE_ENTRYPOINTS))
    hosts_file: str = "/etc/hosts"  # "" disables hostname mapping
    # Give each pod process its namespace's view of the hosts file (a mount namespace; see hostsfile.py).
    private_hosts: bool = True
    remove_nodes_on_stop: bool = True
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 5.0
    shutdown_grace_seconds: float = 5.0  # cap on a pod's grace period when the agent (the node) shuts down
    parent_pid: int | None = None  # stop when this process is gone (the pytest process that started the agent)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AgentConfig:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

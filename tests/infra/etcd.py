"""A single-member etcd on loopback with a throwaway data dir (the kube-apiserver's storage)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.infra.processes import (
    DEFAULT_TIMEOUT_S,
    ManagedProcess,
    ProcessExitedError,
    free_ports,
    http_get,
    is_port_clash,
    start_process,
    tool,
)


@dataclass
class Etcd:
    """A running etcd: `client_url` is what `--etcd-servers` takes."""

    process: ManagedProcess
    client_url: str
    data_dir: Path
    log_dir: Path

    def healthy(self) -> bool:
        status, body = http_get(f"{self.client_url}/health", timeout=2.0)
        return status == 200 and json.loads(body).get("health") == "true"

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT_S, *, attempts: int = 3) -> None:
        """Wait for /health; if a port was taken meanwhile, restart on new ports (fresh data dir)."""
        for remaining in range(attempts - 1, -1, -1):
            try:
                self.process.wait_ready(self.healthy, what=f"etcd health at {self.client_url}/health", timeout=timeout)
                return
            except ProcessExitedError as err:
                if remaining == 0 or not is_port_clash(err):
                    raise
                self._restart(*free_ports(2))

    def _restart(self, client_port: int, peer_port: int) -> None:
        self.process.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        fresh = start_etcd(self.data_dir, self.log_dir, ports=(client_port, peer_port))
        self.process, self.client_url = fresh.process, fresh.client_url

    def stop(self) -> None:
        self.process.stop()


def etcd_args(data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    """Command-line flags for a one-member loopback etcd tuned for tests (no fsync, quiet logs)."""
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    return [
        "--name=test",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=test={peer}",
        "--initial-cluster-state=new",
        # Test data is disposable: skipping fsync makes every write much cheaper on a busy shared disk.
        "--unsafe-no-fsync=true",
        "--quota-backend-bytes=2147483648",
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=5m",
        "--log-level=warn",
    ]


def start_etcd(data_dir: Path, log_dir: Path, *, ports: tuple[int, int] | None = None) -> Etcd:
    """Start etcd on `ports` (client, peer; default: free ones). Does not wait: call `wait_ready`."""
    client_port, peer_port = ports or free_ports(2)
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    proc = start_process("etcd", [tool("etcd"), *etcd_args(data_dir, client_port, peer_port)], log_dir=log_dir)
    return Etcd(process=proc, client_url=f"http://127.0.0.1:{client_port}", data_dir=data_dir, log_dir=log_dir)

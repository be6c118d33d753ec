"""A SeaweedFS S3 server (`weed server -s3`) on loopback with one static access key.

Every component (master, volume, filer, s3) gets its own free HTTP and gRPC port, so several sessions (and
several engineers' test runs) can share the machine. Ready when an authenticated ListBuckets succeeds.
"""

from __future__ import annotations

import json
import secrets
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.infra.processes import (
    DEFAULT_TIMEOUT_S,
    ManagedProcess,
    ProcessExitedError,
    free_ports,
    is_port_clash,
    start_process,
    tool,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REGION = "us-east-1"


def identity_config(access_key: str, secret_key: str) -> dict[str, Any]:
    """SeaweedFS `-s3.config` JSON: one identity with full rights."""
    return {
        "identities": [
            {
                "name": "dbo-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }


def weed_server_args(data_dir: Path, config_file: Path, ports: dict[str, int]) -> list[str]:
    """Flags for `weed server` with master, volume, filer and S3 on the given loopback ports.

    `ports` keys: master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc.
    """
    return [
        "server",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        # Small volumes and no fixed volume count: every bucket is a collection with its own volumes.
        "-master.volumeSizeLimitMB=64",
        "-master.telemetry=false",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config_file}",
        # No embedded IAM/STS API: the static identities above are all the tests need.
        "-s3.iam=false",
        # Tests delete buckets they filled; let them.
        "-s3.allowDeleteBucketNotEmpty=true",
    ]


PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


@dataclass
class S3Server:
    """A running S3-compatible server.

    Attributes:
        endpoint: http://127.0.0.1:<port> (use path-style addressing).
        access_key / secret_key / region: credentials that work against it.
    """

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    process: ManagedProcess
    work_dir: Path
    log_dir: Path

    def client(self, *, connect_timeout: float = 5, read_timeout: float = 60, max_attempts: int = 3) -> S3Client:
        """A boto3 S3 client for this server (path-style, SigV4, quick retries)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            ),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique `test-<hex>` name unless given) and return its name."""
        bucket = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def env(self) -> dict[str, str]:
        """AWS_* variables (and the endpoint) for subprocesses such as the trainer.

        Sets AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_S3 (read by boto3 itself) and S3_ENDPOINT_URL.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "S3_ENDPOINT_URL": self.endpoint,
            # Path-style addressing for clients that read it from the environment.
            "AWS_S3_ADDRESSING_STYLE": "path",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def list_buckets_ok(self) -> bool:
        """One quick ListBuckets (short timeouts, no retries: readiness polling does the retrying)."""
        self.client(connect_timeout=2, read_timeout=5, max_attempts=1).list_buckets()
        return True

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT_S, *, attempts: int = 3) -> None:
        """Wait until ListBuckets works; if a port was taken meanwhile, restart on new ports (fresh data)."""
        for remaining in range(attempts - 1, -1, -1):
            try:
                self.process.wait_ready(
                    self.list_buckets_ok, what=f"S3 ListBuckets at {self.endpoint}", timeout=timeout
                )
                return
            except ProcessExitedError as err:
                if remaining == 0 or not is_port_clash(err):
                    raise
                self.process.stop(grace=1.0)
                shutil.rmtree(self.work_dir / "seaweedfs", ignore_errors=True)
                fresh = start_s3(self.work_dir, self.log_dir, credentials=(self.access_key, self.secret_key))
                self.process, self.endpoint = fresh.process, fresh.endpoint

    def stop(self) -> None:
        # weed's graceful shutdown hangs for many seconds; the data is disposable, so do not wait long.
        self.process.stop(grace=1.0)


def start_s3(
    work_dir: Path, log_dir: Path, *, credentials: tuple[str, str] | None = None, ports: Sequence[int] | None = None
) -> S3Server:
    """Start SeaweedFS with a fresh data dir (does not wait: call `wait_ready`).

    `credentials` (access key, secret key) default to random ones; `ports` (8, in `PORT_NAMES` order) to free ones.
    """
    data_dir = work_dir / "seaweedfs"
    data_dir.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = credentials or ("dbo" + secrets.token_hex(8), secrets.token_hex(20))
    config_file = work_dir / "s3-identities.json"
    config_file.write_text(json.dumps(identity_config(access_key, secret_key), indent=2))
    config_file.chmod(0o600)
    port_map = dict(zip(PORT_NAMES, ports or free_ports(len(PORT_NAMES)), strict=True))
    proc = start_process(
        "seaweedfs", [tool("weed"), *weed_server_args(data_dir, config_file, port_map)], log_dir=log_dir, cwd=data_dir
    )
    return S3Server(
        endpoint=f"http://127.0.0.1:{port_map['s3']}",
        access_key=access_key,
        secret_key=secret_key,
        region=REGION,
        process=proc,
        work_dir=work_dir,
        log_dir=log_dir,
    )

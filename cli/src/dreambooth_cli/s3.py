"""S3 for the CLI: upload a subject's photos (skipping unchanged ones) and fetch a run's outputs for a report.

Credentials: the AWS_* environment variables (or any boto3 credential source), else the job's
spec.storage.credentialsSecret read from the cluster (the same credentials the job's pods get).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dreambooth_cli.errors import CliError, InputError
from dreambooth_cli.kube import Target, call
from dreambooth_cli.sync import LocalFile, RemoteObject, plan_uploads

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SHA256_METADATA = "sha256"
REPORT_FILES = (
    "metrics.jsonl",
    "config.json",
    "result.json",
    "evaluation.json",
    "evaluation/result.json",
    "evaluation/grid.png",
    "captions.json",
)


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise InputError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def secret_credentials(target: Target, namespace: str, storage: dict[str, Any]) -> dict[str, str]:
    ref = storage.get("credentialsSecret")
    if not isinstance(ref, dict) or not ref.get("name"):
        return {}
    secret = call(target, target.core.read_namespaced_secret, ref["name"], namespace)
    data = secret.data or {}

    def value(key: str) -> str | None:
        raw = data.get(key)
        return base64.b64decode(raw).decode() if raw else None

    creds = {
        "aws_access_key_id": value(ref.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID")),
        "aws_secret_access_key": value(ref.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY")),
        "aws_session_token": value(ref["sessionTokenKey"]) if ref.get("sessionTokenKey") else None,
    }
    return {k: v for k, v in creds.items() if v}


def make_client(storage: dict[str, Any], credentials: dict[str, str] | None = None) -> S3Client:
    """A boto3 S3 client for a job's spec.storage (endpoint, region, addressingStyle)."""
    style: Literal["auto", "virtual", "path"] = storage.get("addressingStyle") or "auto"
    creds = credentials or {}
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=storage.get("endpoint") or None,
        region_name=storage.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        config=Config(s3={"addressing_style": style}, retries={"mode": "standard", "max_attempts": 3}),
        aws_access_key_id=creds.get("aws_access_key_id"),
        aws_secret_access_key=creds.get("aws_secret_access_key"),
        aws_session_token=creds.get("aws_session_token"),
    )
    return client


def client_for_job(target: Target | None, job: dict[str, Any]) -> S3Client:
    storage = job.get("spec", {}).get("storage") or {}
    have_env = bool(os.environ.get("AWS_ACCESS_KEY_ID"))
    credentials = (
        {}
        if have_env or target is None
        else secret_credentials(target, job.get("metadata", {}).get("namespace") or target.namespace, storage)
    )
    return make_client(storage, credentials)


def remote_objects(s3: S3Client, bucket: str, prefix: str) -> dict[str, RemoteObject]:
    """Objects directly below a prefix, by name, with ETag and the sha256 metadata (HEAD for ambiguous ETags)."""
    found: dict[str, RemoteObject] = {}
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if "/" in name or not name:
                continue
            etag = str(obj.get("ETag", "")).strip('"')
            sha = None
            if "-" in etag or not etag:
                head = s3.head_object(Bucket=bucket, Key=obj["Key"])
                sha = head.get("Metadata", {}).get(SHA256_METADATA)
            found[name] = RemoteObject(name, etag=etag or None, sha256=sha, size=obj.get("Size"))
    return found


def upload_images(s3: S3Client, files: list[LocalFile], prefix_uri: str) -> tuple[int, int]:
    """Upload files below the prefix unless already there with the same checksum; returns (uploaded, skipped)."""
    bucket, key = split_uri(prefix_uri.rstrip("/") + "/")
    try:
        todo = plan_uploads(files, remote_objects(s3, bucket, key))
        for f in todo:
            s3.upload_file(str(f.path), bucket, key + f.name, ExtraArgs={"Metadata": {SHA256_METADATA: f.sha256}})
    except (BotoCoreError, ClientError) as err:
        raise CliError(f"upload to {prefix_uri} failed: {err}") from err
    return len(todo), len(files) - len(todo)


def download_run(s3: S3Client, output_uri: str, dest: Path) -> Path:
    """Fetch what a report needs (metrics, config, result, samples, checkpoint manifests) into a local folder."""
    bucket, prefix = split_uri(output_uri.rstrip("/") + "/")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                wanted = (
                    rel in REPORT_FILES
                    or (rel.startswith("samples/") and rel.endswith(".png"))
                    or (rel.startswith("checkpoints/") and rel.endswith("/manifest.json"))
                )
                if wanted:
                    local = dest / rel
                    local.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, obj["Key"], str(local))
    except (BotoCoreError, ClientError) as err:
        raise CliError(f"cannot read {output_uri}: {err}") from err
    return dest

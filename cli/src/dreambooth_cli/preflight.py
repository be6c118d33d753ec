"""`dreambooth submit`'s input check, with the S3 credentials `submit` already reads (s3.client_for_job): the bucket of
spec.instanceImages exists and its prefix holds images, before the job is created.

Only a definite answer stops the submit (InputError: "bucket X does not exist", "no images under s3://b/p/"). When
the check cannot be made from this machine (no credentials, an endpoint only the cluster reaches, access refused to
these credentials) it says so and the submit goes on: the operator's CPU-only check (`<job>-check`) runs in the
cluster before any GPU is held.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dreambooth_cli import s3
from dreambooth_cli.errors import CliError, InputError
from dreambooth_cli.kube import Target
from dreambooth_cli.sync import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def _missing_bucket(err: ClientError) -> bool:
    code = str(err.response.get("Error", {}).get("Code", ""))
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchBucket", "NotFound") or status == 404


def image_uris(spec: Mapping[str, Any]) -> list[str]:
    """The locations spec.instanceImages names: its prefix, or its explicit files."""
    images = spec.get("instanceImages") or {}
    if images.get("uri"):
        return [str(images["uri"])]
    return [str(u) for u in images.get("files") or []]


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def check_images(client: S3Client, spec: Mapping[str, Any]) -> str | None:
    """Raise InputError when the images' bucket does not exist or their prefix holds no image; return why the
    check could not be made (a note to show), or None once it passed."""
    uris = [u for u in image_uris(spec) if u.startswith("s3://")]
    if not uris:
        return None
    try:
        for bucket in dict.fromkeys(_split(u)[0] for u in uris):
            try:
                client.head_bucket(Bucket=bucket)
            except ClientError as err:
                if _missing_bucket(err):
                    raise InputError(f"spec.instanceImages: bucket {bucket} does not exist") from err
                raise
        prefix_uri = str((spec.get("instanceImages") or {}).get("uri") or "")
        if prefix_uri.startswith("s3://"):
            bucket, key = _split(prefix_uri.rstrip("/") + "/")
            answer = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1000)
            names = [str(o.get("Key", "")) for o in answer.get("Contents", [])]
            if not any(PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES for n in names) and not answer.get(
                "IsTruncated"
            ):
                raise InputError(f"spec.instanceImages: no images (jpg, jpeg, png, webp) under {prefix_uri}")
    except (ClientError, BotoCoreError) as err:
        return f"could not check spec.instanceImages from here ({err}); the operator checks it before training"
    return None


def quick_client(target: Target, job: Mapping[str, Any]) -> S3Client:
    """An S3 client for the job's storage with the credentials `submit` uses (s3.client_for_job), but quick to give
    up: the endpoint may be one only the cluster reaches."""
    storage = dict((job.get("spec") or {}).get("storage") or {})
    namespace = (job.get("metadata") or {}).get("namespace") or target.namespace
    creds = {} if os.environ.get("AWS_ACCESS_KEY_ID") else s3.secret_credentials(target, namespace, storage)
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=storage.get("endpoint") or None,
        region_name=storage.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        config=Config(
            s3={"addressing_style": storage.get("addressingStyle") or "auto"},
            retries={"mode": "standard", "max_attempts": 2},
            connect_timeout=5,
            read_timeout=15,
        ),
        aws_access_key_id=creds.get("aws_access_key_id"),
        aws_secret_access_key=creds.get("aws_secret_access_key"),
        aws_session_token=creds.get("aws_session_token"),
    )
    return client


def check_job(target: Target, job: Mapping[str, Any]) -> str | None:
    """`check_images` for a job manifest; the Secret that holds its credentials unreadable is a note, too."""
    spec = job.get("spec") or {}
    if not any(u.startswith("s3://") for u in image_uris(spec)):
        return None
    try:
        client = quick_client(target, job)
    except (CliError, BotoCoreError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        return f"could not check spec.instanceImages from here ({err}); the operator checks it before training"
    return check_images(client, spec)

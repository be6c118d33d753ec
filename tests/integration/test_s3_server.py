"""The SeaweedFS S3 server fixture speaks enough S3 for the trainer's storage: objects, listing, multipart."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from tests.infra.processes import free_ports
from tests.infra.s3 import PORT_NAMES, S3Server, start_s3

MIB = 1024 * 1024


def test_put_get_list_delete(s3: S3Server) -> None:
    bucket = s3.make_bucket()
    client = s3.client()
    keys = ["runs/a/checkpoints/step-1/manifest.json", "runs/a/checkpoints/step-1/weights.bin", "runs/b/result.json"]
    for i, key in enumerate(keys):
        client.put_object(Bucket=bucket, Key=key, Body=f"payload {i}".encode())

    assert client.get_object(Bucket=bucket, Key=keys[1])["Body"].read() == b"payload 1"
    listed = client.list_objects_v2(Bucket=bucket, Prefix="runs/a/")
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(keys[:2])
    delimited = client.list_objects_v2(Bucket=bucket, Prefix="runs/", Delimiter="/")
    assert sorted(p["Prefix"] for p in delimited["CommonPrefixes"]) == ["runs/a/", "runs/b/"]

    client.delete_object(Bucket=bucket, Key=keys[0])
    with pytest.raises(ClientError) as excinfo:
        client.get_object(Bucket=bucket, Key=keys[0])
    assert excinfo.value.response["Error"]["Code"] == "NoSuchKey"
    remaining = client.list_objects_v2(Bucket=bucket, Prefix="runs/a/")
    assert [o["Key"] for o in remaining["Contents"]] == [keys[1]]


def test_make_bucket_gives_unique_buckets(s3: S3Server) -> None:
    first, second = s3.make_bucket(), s3.make_bucket()
    assert first != second
    names = {b["Name"] for b in s3.client().list_buckets()["Buckets"]}
    assert {first, second} <= names


def test_multipart_upload_of_a_large_object(s3: S3Server) -> None:
    bucket = s3.make_bucket()
    client = s3.client()
    data = os.urandom(9 * MIB + 12345)
    # 5 MiB parts (the S3 minimum): the object is uploaded in two parts.
    config = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    client.upload_fileobj(io.BytesIO(data), bucket, "big.bin", Config=config)

    head = client.head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-2"), head["ETag"]  # a multipart ETag names its part count
    body = client.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()


def test_wrong_credentials_are_rejected(s3: S3Server) -> None:
    intruder = dataclasses.replace(s3, secret_key="not-the-secret")
    with pytest.raises(ClientError) as excinfo:
        intruder.client().list_buckets()
    assert excinfo.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"}


def test_s3_env_configures_a_subprocess(s3: S3Server, s3_env: dict[str, str]) -> None:
    bucket = s3.make_bucket()
    s3.client().put_object(Bucket=bucket, Key="hello.txt", Body=b"from the fixture")
    script = (
        "import boto3, sys; "
        "c = boto3.client('s3'); "
        "print(c.get_object(Bucket=sys.argv[1], Key='hello.txt')['Body'].read().decode())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_env
    result = subprocess.run(
        [sys.executable, "-c", script, bucket], env=env, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from the fixture"


def test_s3_server_recovers_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = free_ports(len(PORT_NAMES))
        ports[PORT_NAMES.index("s3")] = taken
        server = start_s3(tmp_path / "work", tmp_path / "logs", ports=ports)
        try:
            server.wait_ready(timeout=120)
            assert server.endpoint != f"http://127.0.0.1:{taken}"
            bucket = server.make_bucket()
            server.client().put_object(Bucket=bucket, Key="k", Body=b"v")
        finally:
            server.stop()
    assert "address already in use" in (tmp_path / "logs" / "seaweedfs.log").read_text()

"""`dreambooth submit` checks spec.instanceImages with the job's own credentials (its Secret) against the real S3
server before it creates the job: a missing bucket and an empty prefix stop it with the cause; `--no-check` skips
the check; an endpoint this machine cannot reach is a warning, not an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dreambooth_cli.errors import ExitStatus
from tests.infra.processes import free_ports
from tests.integration.test_cli_cluster import (  # noqa: F401 - its fixtures (cli_env, crds, storage), by name
    cli_env,
    crds,
    dreambooth,
    job_manifest,
    photos,
    storage,
    write_job,
)


def fixtures(request: pytest.FixtureRequest) -> tuple[dict[str, Any], dict[str, str]]:
    """test_cli_cluster's `storage` (a bucket and the Secret with its credentials) and `cli_env` (no AWS_*)."""
    return request.getfixturevalue("storage"), request.getfixturevalue("cli_env")


def exists(cluster: Any, namespace: str, name: str) -> bool:
    return cluster.kubectl("get", "dbj", name, "-n", namespace, check=False).returncode == 0


@pytest.mark.usefixtures("crds")
def test_submit_refuses_a_missing_bucket_and_an_empty_prefix(
    cluster: Any, s3: Any, namespace: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    stored, env = fixtures(request)
    bucket = stored["bucket"]
    missing = f"no-such-bucket-{bucket[-8:]}"
    nobucket = job_manifest("nobucket", bucket, stored["spec"])
    nobucket["spec"]["instanceImages"]["uri"] = f"s3://{missing}/photos/"
    result = dreambooth(env, "submit", str(write_job(tmp_path, nobucket)), "-n", namespace)
    assert result.returncode == ExitStatus.INVALID_INPUT, result.stderr
    assert result.stderr.strip() == f"error: spec.instanceImages: bucket {missing} does not exist"
    assert not exists(cluster, namespace, "nobucket")

    empty = job_manifest("empty", bucket, stored["spec"])
    s3.client().put_object(Bucket=bucket, Key="photos/empty/notes.txt", Body=b"no photos here")
    result = dreambooth(env, "submit", str(write_job(tmp_path, empty)), "-n", namespace)
    assert result.returncode == ExitStatus.INVALID_INPUT, result.stderr
    assert result.stderr.strip() == (
        f"error: spec.instanceImages: no images (jpg, jpeg, png, webp) under s3://{bucket}/photos/empty/"
    )
    assert not exists(cluster, namespace, "empty")
    assert s3.secret_key not in result.stderr + result.stdout

    # Photos there: it is created; --no-check creates even the empty one (the operator's check fails it later).
    s3.client().put_object(Bucket=bucket, Key="photos/empty/x.png", Body=b"a photo, as far as names go")
    result = dreambooth(env, "submit", str(write_job(tmp_path, empty)), "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert exists(cluster, namespace, "empty")
    result = dreambooth(env, "submit", str(write_job(tmp_path, nobucket)), "--no-check", "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert exists(cluster, namespace, "nobucket")


@pytest.mark.usefixtures("crds")
def test_an_endpoint_this_machine_cannot_reach_is_a_warning(
    cluster: Any, namespace: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    stored, env = fixtures(request)
    (port,) = free_ports(1)
    job = job_manifest("inside", stored["bucket"], {**stored["spec"], "endpoint": f"http://127.0.0.1:{port}"})
    result = dreambooth(env, "submit", str(write_job(tmp_path, job)), "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert "could not check spec.instanceImages from here" in result.stderr
    assert exists(cluster, namespace, "inside")


@pytest.mark.usefixtures("crds")
def test_photos_uploaded_by_submit_pass_the_check(
    cluster: Any, namespace: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    stored, env = fixtures(request)
    job = job_manifest("toy", stored["bucket"], stored["spec"])
    folder = photos(tmp_path / "photos")
    result = dreambooth(env, "submit", str(write_job(tmp_path, job)), "--images", str(folder), "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert "could not check" not in result.stderr
    assert exists(cluster, namespace, "toy")

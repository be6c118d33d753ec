"""`run --local`: URI rewriting, the tiny model, the trainer's config, images staged with checksums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dreambooth_cli import localrun
from dreambooth_cli.errors import ExitStatus, InputError
from dreambooth_cli.sync import LocalFile, RemoteObject, collect_images, plan_uploads, sync_to_folder
from tests.infra.paths import ROOT


def demo_job() -> dict:
    return yaml.safe_load((ROOT / "examples" / "demo-job.yaml").read_text())


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b.png", "s3/bucket/a/b.png"),
        ("s3://bucket/prefix/", "s3/bucket/prefix"),
        ("s3://bucket", "s3/bucket"),
    ],
)
def test_s3_uris_move_into_the_workdir(tmp_path: Path, uri: str, expected: str) -> None:
    local = localrun.to_local_uri(uri, tmp_path)
    assert local.startswith("file:///")
    assert localrun.uri_to_path(local) == tmp_path.resolve() / expected


@pytest.mark.parametrize(
    "uri", ["s3://b/../../../etc/x", "s3://b/a/../../x", "s3://b/./x", "s3://../etc", "s3://b/a/.."]
)
def test_s3_uris_cannot_leave_the_workdir(tmp_path: Path, uri: str) -> None:
    """Issue 17 (9): `s3://b/../../../etc/x` used to map to a path outside the workdir."""
    with pytest.raises(InputError, match="cannot be mapped"):
        localrun.to_local_uri(uri, tmp_path)


def test_s3_uris_cannot_follow_a_symlink_out_of_the_workdir(tmp_path: Path) -> None:
    (tmp_path / "s3").mkdir()
    (tmp_path / "s3" / "bucket").symlink_to(tmp_path.parent)
    with pytest.raises(InputError, match="outside the local workdir"):
        localrun.to_local_uri("s3://bucket/x", tmp_path)


def test_other_uris_are_kept(tmp_path: Path) -> None:
    assert localrun.to_local_uri("file:///data/x", tmp_path) == "file:///data/x"
    assert localrun.to_local_uri("a photo of sks toy", tmp_path) == "a photo of sks toy"


def test_local_config_rewrites_every_uri_and_drops_s3_settings(tmp_path: Path) -> None:
    job = demo_job()
    job["spec"]["storage"] = {"endpoint": "http://minio:9000", "credentialsSecret": {"name": "s3"}}
    job["spec"]["priorPreservation"] = {"enabled": True, "classPrompt": "a toy", "cacheUri": "s3://cache/priors"}
    config = localrun.local_trainer_config(job, tmp_path, tiny=False)
    text = json.dumps(config)
    assert "s3://" not in text
    assert "storage" not in config
    assert config["output"]["uri"] == (tmp_path.resolve() / "s3/demo/models/demo-toy").as_uri()
    assert config["priorPreservation"]["cacheUri"].endswith("/s3/cache/priors")
    assert config["name"] == "demo-toy"
    assert config["instanceImages"]["prompt"] == "a photo of sks toy"
    assert job["spec"]["storage"]["endpoint"] == "http://minio:9000"  # the input is not mutated


@pytest.mark.parametrize(
    ("base_model", "tiny", "expected"),
    [
        (None, False, {"tiny": True}),
        ({"id": "org/model"}, True, {"tiny": True}),
        ({"id": "org/model"}, False, {"id": "org/model"}),
    ],
)
def test_tiny_model_when_none_is_named_or_asked(
    tmp_path: Path, base_model: dict | None, tiny: bool, expected: dict
) -> None:
    job = demo_job()
    job["spec"].pop("baseModel")
    if base_model is not None:
        job["spec"]["baseModel"] = base_model
    assert localrun.local_trainer_config(job, tmp_path, tiny=tiny)["baseModel"] == expected


def test_images_need_a_prefix(tmp_path: Path) -> None:
    job = demo_job()
    job["spec"]["instanceImages"] = {"files": ["s3://demo/a.png"], "prompt": "p"}
    with pytest.raises(InputError, match=r"--images needs spec\.instanceImages\.uri"):
        localrun.instance_images_dir(localrun.local_trainer_config(job, tmp_path, tiny=False))


def test_staging_copies_changed_images_only(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"\x89PNG a")
    (photos / "b.jpg").write_bytes(b"jpeg b")
    (photos / "b.txt").write_text("a photo of sks toy")
    (photos / "notes.md").write_text("ignored")
    target = tmp_path / "prefix"
    assert sync_to_folder(collect_images(photos), target) == (3, 0)
    assert sorted(p.name for p in target.iterdir()) == ["a.png", "b.jpg", "b.txt"]
    assert sync_to_folder(collect_images(photos), target) == (0, 3)
    (photos / "a.png").write_bytes(b"\x89PNG changed")
    assert sync_to_folder(collect_images(photos), target) == (1, 2)
    assert (target / "a.png").read_bytes() == b"\x89PNG changed"


def test_a_folder_without_images_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no images"):
        collect_images(tmp_path)
    with pytest.raises(InputError, match="images folder not found"):
        collect_images(tmp_path / "missing")


def lf(name: str, md5: str = "m", sha: str = "s") -> LocalFile:
    return LocalFile(name, Path(name), md5, sha, 1)


@pytest.mark.parametrize(
    ("remote", "upload"),
    [
        ({}, True),
        ({"a.png": RemoteObject("a.png", etag='"m"')}, False),  # single-part ETag is the MD5
        ({"a.png": RemoteObject("a.png", etag='"other"')}, True),
        ({"a.png": RemoteObject("a.png", etag='"m-2"')}, True),  # multipart ETag, no sha256: cannot tell
        ({"a.png": RemoteObject("a.png", etag='"x-2"', sha256="s")}, False),  # our sha256 metadata decides
        ({"a.png": RemoteObject("a.png", etag='"m"', sha256="t")}, True),
    ],
)
def test_upload_plan(remote: dict[str, RemoteObject], upload: bool) -> None:
    assert (plan_uploads([lf("a.png")], remote) != []) == upload


def test_outcome_messages(tmp_path: Path) -> None:
    config = {"output": {"uri": (tmp_path / "out").as_uri()}}
    (tmp_path / "train.log").write_text("Traceback...\nRuntimeError: boom\n")
    ok = localrun.LocalRun(tmp_path, config, 0, {})
    localrun.check_outcome(ok)
    assert ok.output_dir == tmp_path / "out"
    invalid = localrun.LocalRun(tmp_path, config, 10, {"reason": "InvalidInput", "message": "training.maxSteps: bad"})
    with pytest.raises(localrun.CliError, match=r"invalid job \(checked by the trainer\): training.maxSteps") as err:
        localrun.check_outcome(invalid)
    assert err.value.status == ExitStatus.INVALID_INPUT
    crashed = localrun.LocalRun(tmp_path, config, 1, {})
    with pytest.raises(localrun.CliError, match=r"training failed \(exit 1\): RuntimeError: boom \(log: "):
        localrun.check_outcome(crashed)


def test_output_dir_from_a_workdir_record(tmp_path: Path) -> None:
    out = tmp_path / "s3" / "b" / "out"
    (tmp_path / localrun.RUN_RECORD).write_text(json.dumps({"outputUri": out.as_uri()}))
    assert localrun.output_dir_of(tmp_path) == out
    assert localrun.output_dir_of(out) == out


@pytest.mark.parametrize(
    ("base_model", "environ", "expected"),
    [
        ({"tiny": True}, {}, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
        ({"tiny": True}, {"OMP_NUM_THREADS": "4"}, {}),
        ({"id": "org/model"}, {}, {}),
    ],
)
def test_one_cpu_thread_for_the_tiny_model_unless_set(base_model: dict, environ: dict, expected: dict) -> None:
    assert localrun.thread_env({"baseModel": base_model}, environ) == expected

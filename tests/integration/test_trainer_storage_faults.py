"""Storage faults (issue 17, chaos): the trainer against the S3 server through a fault-injecting proxy
(tests/infra/faultproxy.py: 500s, 503 SlowDown, connection resets, latency and truncated bodies).

- At 10 % faults a tiny training run completes, and every checkpoint it left verifies (sizes and sha256 against
  its manifest, and it deserializes).
- A truncated response body is detected (botocore checks the Content-Length), retried, and never taken for the
  object: a read that keeps breaking off fails as StorageUnavailable (retryable), a checkpoint read that does is
  kept (CheckpointUnavailableError), not skipped as corrupt, and a download leaves no file behind.
- An outage longer than the retry budget fails the attempt as retryable (exit 11, reason StorageUnavailable), and
  so does a new attempt started during it; once storage is back the next attempt resumes from the newest complete
  checkpoint, never from step 0.

The faults are drawn from a fixed seed (DBO_FAULT_SEED overrides it), printed with the proxy and in every
assertion message. The outage test caps the retry budget with AWS_MAX_ATTEMPTS=3 (the trainer's default is 8
attempts in botocore's standard mode, about half a minute of backoff) to stay quick.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dreambooth_api.config import StorageSettings
from dreambooth_trainer.checkpoint import CheckpointStore
from dreambooth_trainer.checkpoint.store import CheckpointUnavailableError
from dreambooth_trainer.storage import ObjectStore, StorageError
from tests.infra.faultproxy import FaultProxy
from tests.infra.reliability import record
from tests.infra.s3 import S3Server
from tests.integration.trainer_runs import TrainerRun, put_images, tiny_job

SEED = int(os.environ.get("DBO_FAULT_SEED", "1706"))
ALL_KINDS = ("error500", "slowdown", "reset", "latency", "truncate")


@pytest.fixture
def aws(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 credentials in this process too (the tests read checkpoints with the trainer's own store)."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def bucket(s3: S3Server) -> str:
    name = s3.make_bucket()
    put_images(s3, name, "subject", count=3)
    return name


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3.endpoint, rate=0.0, seed=SEED) as p:
        yield p


def _direct(s3: S3Server) -> ObjectStore:
    return ObjectStore(StorageSettings(endpoint=s3.endpoint, region=s3.region, addressing_style="path"))


def _through(proxy: FaultProxy, s3: S3Server) -> ObjectStore:
    return ObjectStore(StorageSettings(endpoint=proxy.endpoint, region=s3.region, addressing_style="path"))


def _verified_steps(s3: S3Server, bucket: str, out: str) -> list[int]:
    """Every complete checkpoint under the output, each loaded and verified against its manifest (raises if not)."""
    ckpt = CheckpointStore(_direct(s3), f"s3://{bucket}/{out}/checkpoints")
    steps = ckpt.complete_steps()
    for step in steps:
        assert ckpt.load(step).info.step == step
    return sorted(steps)


def _job(s3: S3Server, proxy: FaultProxy, bucket: str, out: str, **training: object) -> dict[str, object]:
    config = tiny_job(s3, bucket, out, **training)
    config["storage"] = {"endpoint": proxy.endpoint, "region": s3.region, "addressingStyle": "path"}
    return config


def test_a_run_completes_with_intact_checkpoints_at_ten_percent_faults(
    s3: S3Server, bucket: str, proxy: FaultProxy, aws: None, tmp_path: Path
) -> None:
    proxy.rate = 0.10
    config = _job(s3, proxy, bucket, "faulty", maxSteps=20, checkpoint={"intervalSteps": 2, "keep": 20})
    run = TrainerRun(config, tmp_path, s3.env(), extra_env={"OMP_NUM_THREADS": "1"})
    code = run.wait(timeout=600)
    assert code == 0, f"{proxy!r}\n{run._details()}"
    assert run.termination()["status"] == "succeeded"
    assert sum(proxy.injected.values()) >= 4, repr(proxy)
    assert _verified_steps(s3, bucket, "faulty") == list(range(2, 21, 2)), repr(proxy)
    lora = _direct(s3).read_bytes(f"s3://{bucket}/faulty/lora/pytorch_lora_weights.safetensors")
    assert len(lora) > 0
    print(f"faults injected: {dict(proxy.injected)} of {proxy.requests} requests (seed {proxy.seed})")
    for kind, count in proxy.injected.items():
        record(f"storage.{kind}", injected=count, survived=count, dataLost=0, requests=proxy.requests, rate=0.10)


def test_truncated_bodies_are_detected_retried_and_never_taken(
    s3: S3Server, bucket: str, proxy: FaultProxy, aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    data = os.urandom(256 * 1024)
    direct = _direct(s3)
    direct.write_bytes(f"s3://{bucket}/t/blob", data)
    store = _through(proxy, s3)

    proxy.kinds, proxy.rate = ("truncate",), 1.0  # every response breaks off halfway
    with pytest.raises(StorageError, match="blob"):
        store.read_bytes(f"s3://{bucket}/t/blob")
    target = tmp_path / "blob"
    with pytest.raises(StorageError):
        store.download_file(f"s3://{bucket}/t/blob", target)
    assert not target.exists()
    assert not list(tmp_path.glob(".blob.part-*"))

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "8")  # the trainer's default budget
    store = _through(proxy, s3)
    proxy.rate = 0.3  # some of them: the retries get the whole body
    for _ in range(4):
        assert store.read_bytes(f"s3://{bucket}/t/blob") == data, repr(proxy)
        store.download_file(f"s3://{bucket}/t/blob", target)
        assert target.read_bytes() == data, repr(proxy)
    # A PUT whose answer is lost after the server stored it is sent again: same object.
    store.write_bytes(f"s3://{bucket}/t/put", data)
    assert direct.read_bytes(f"s3://{bucket}/t/put") == data

    # A checkpoint whose reads keep breaking off is kept (retryable), not skipped as corrupt for an older one.
    config = _job(s3, proxy, bucket, "trunc", maxSteps=4, checkpoint={"intervalSteps": 2, "keep": 5})
    proxy.rate = 0.0
    run = TrainerRun(config, tmp_path / "run", s3.env(), extra_env={"OMP_NUM_THREADS": "1"})
    assert run.wait() == 0, run._details()
    assert _verified_steps(s3, bucket, "trunc") == [2, 4]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    proxy.rate = 1.0
    ckpt = CheckpointStore(_through(proxy, s3), f"s3://{bucket}/trunc/checkpoints")
    with pytest.raises(CheckpointUnavailableError):
        ckpt.load(4)
    with pytest.raises(StorageError):  # the listing breaks off too: retryable, nothing skipped
        ckpt.load_latest()
    print(f"faults injected: {dict(proxy.injected)} of {proxy.requests} requests (seed {proxy.seed})")
    truncated = proxy.injected["truncate"]  # every one detected: never taken for the object
    record("storage.truncate-detected", injected=truncated, survived=truncated, dataLost=0)


def test_an_outage_longer_than_the_retries_fails_the_attempt_and_the_next_resumes(
    s3: S3Server, bucket: str, proxy: FaultProxy, aws: None, tmp_path: Path
) -> None:
    env = {"OMP_NUM_THREADS": "1", "AWS_MAX_ATTEMPTS": "3"}
    config = _job(s3, proxy, bucket, "outage", maxSteps=40, checkpoint={"intervalSteps": 4, "keep": 3})
    first = TrainerRun(config, tmp_path / "a0", s3.env(), extra_env=env, name="a0")
    first.wait_event(lambda e: e.get("event") == "checkpoint_written" and e["step"] >= 8, "a checkpoint at step 8")
    with proxy.outage():
        # Training goes on; checkpoints fail in the background, and the final checkpoint and metrics upload fail
        # after their retries: the attempt ends retryable.
        assert first.wait(timeout=600) == 11, f"{proxy!r}\n{first._details()}"
        failed = first.termination()
        assert (failed["status"], failed["reason"]) == ("failed", "StorageUnavailable"), failed
        assert first.named("checkpoint_failed"), first._details()
        # A new attempt while storage is still down fails at once, the same way.
        second = TrainerRun(config, tmp_path / "a1", s3.env(), extra_env=env, name="a1")
        assert second.wait(timeout=300) == 11, second._details()
        assert second.termination()["reason"] == "StorageUnavailable"
        assert second.named("training_started") == []
    before = _verified_steps(s3, bucket, "outage")
    assert before, "no checkpoint survived the outage"
    assert max(before) >= 8
    third = TrainerRun(config, tmp_path / "a2", s3.env(), extra_env=env, name="a2")
    assert third.wait(timeout=600) == 0, third._details()
    assert [e["step"] for e in third.named("resumed")] == [max(before)]  # never from step 0
    assert third.termination()["steps"] == 40
    assert 40 in _verified_steps(s3, bucket, "outage")
    reached = max(e["step"] for e in first.named("step"))  # steps past the newest surviving checkpoint: done again
    record("storage.outage", injected=1, survived=1, stepsRedone=max(0, reached - max(before)), dataLost=0)
    print(f"outage: {proxy.injected['outage']} requests reset (seed {proxy.seed})")


def test_sigterm_during_faults_still_checkpoints(
    s3: S3Server, bucket: str, proxy: FaultProxy, aws: None, tmp_path: Path
) -> None:
    """A preemption while storage misbehaves (10 %): the final checkpoint is written through the retries, and the
    resumed run continues from it."""
    proxy.rate = 0.10
    config = _job(s3, proxy, bucket, "pre", maxSteps=30, checkpoint={"intervalSteps": 50, "keep": 3})
    first = TrainerRun(config, tmp_path / "a0", s3.env(), extra_env={"OMP_NUM_THREADS": "1"}, name="a0")
    first.wait_event(lambda e: e.get("event") == "step" and e["step"] >= 5, "step 5")
    first.signal(signal.SIGTERM)
    assert first.wait() == 12, f"{proxy!r}\n{first._details()}"
    stopped = first.termination()["lastCheckpoint"]["step"]
    assert _verified_steps(s3, bucket, "pre") == [stopped], repr(proxy)
    second = TrainerRun(config, tmp_path / "a1", s3.env(), extra_env={"OMP_NUM_THREADS": "1"}, name="a1")
    assert second.wait(timeout=600) == 0, f"{proxy!r}\n{second._details()}"
    assert [e["step"] for e in second.named("resumed")] == [stopped]
    record("storage.preemption-during-faults", injected=1, survived=1, stepsRedone=0, dataLost=0)


def test_denied_writes_under_a_prefix_are_refused_and_not_retried(s3: S3Server, bucket: str, aws: None) -> None:
    """The proxy's bucket policy: writes under the prefix get 403 AccessDenied at once (botocore does not retry it),
    reads there and writes elsewhere pass."""
    from botocore.exceptions import ClientError

    with FaultProxy(s3.endpoint, seed=SEED, deny_writes_under=f"/{bucket}/locked/") as proxy:
        client = s3.client()
        client.put_object(Bucket=bucket, Key="locked/seed", Body=b"before")  # directly, not through the proxy
        through = _through(proxy, s3)
        with pytest.raises(ClientError) as denied:
            through.s3.put_object(Bucket=bucket, Key="locked/new", Body=b"x")
        assert denied.value.response["Error"]["Code"] == "AccessDenied"
        assert proxy.injected["denied"] == 1  # one attempt: not retried
        assert through.s3.get_object(Bucket=bucket, Key="locked/seed")["Body"].read() == b"before"
        through.s3.put_object(Bucket=bucket, Key="open/new", Body=b"y")
        assert client.get_object(Bucket=bucket, Key="open/new")["Body"].read() == b"y"
        assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="locked/new")

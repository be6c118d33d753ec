"""Two trainer processes on CPU (gloo over loopback) train one job together, as two single-process "nodes"
would in an Indexed Job: PET_NNODES=2, PET_NPROC_PER_NODE=1, PET_NODE_RANK=0/1.

- Both ranks end with identical trainable weights (the digest each rank logs), and rank 0 alone writes
  checkpoints, result.json and the termination message.
- SIGTERM to both: they agree on the step, rank 0 checkpoints, both exit 12; restarted, both resume from
  rank 0's checkpoint. Every rank leaves the process group (a last collective, then destroy_process_group) before
  its interpreter exits: a rank that exited right after its last collective with the group still there could
  abort (SIGABRT) in the backend's worker thread (issue 17, item 11).
- SIGTERM to one rank before training starts: both ranks stop there together (exit 12), instead of the other rank
  going on into a collective with a peer that left.
- The result matches one process with the same global batch (batch 1 x 2 gradient-accumulation steps):
  the micro-batch seeding gives both runs the same examples, noise and timesteps, so they differ only in
  floating-point summation order (DDP all-reduce vs accumulation). Tolerance: rtol 1e-4, atol 1e-6 on every
  trainable tensor, and losses within 1e-4 relative.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors

from tests.infra.processes import free_port
from tests.infra.s3 import S3Server
from tests.integration.trainer_runs import TrainerRun, list_keys, put_images, read_object, tiny_job

STEPS = 10
# `dreambooth-train`, saying at exit (atexit runs before the interpreter finalizes) whether the process group was
# still there: one left to die with the process can abort the rank while it finalizes.
EXIT_CHECK = [
    sys.executable,
    "-c",
    "import atexit, json\n"
    "def _check():\n"
    "    import torch.distributed as dist\n"
    "    print(json.dumps({'event': 'exit_check', 'processGroup': dist.is_initialized()}), flush=True)\n"
    "atexit.register(_check)\n"
    "from dreambooth_trainer.cli import run\n"
    "run()\n",
]


def _dist_env(rank: int, port: int) -> dict[str, str]:
    return {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_NODE_RANK": str(rank),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "NODE_RANK": str(rank),
        "OMP_NUM_THREADS": "1",
    }


def _pair(
    config: dict[str, Any], tmp: Path, s3: S3Server, name: str, argv: list[str] | None = None
) -> list[TrainerRun]:
    port = free_port()
    return [
        TrainerRun(config, tmp / f"{name}-r{r}", s3.env(), extra_env=_dist_env(r, port), name=name, argv=argv)
        for r in (0, 1)
    ]


def _left_the_process_group(runs: list[TrainerRun]) -> None:
    assert [[e["processGroup"] for e in r.named("exit_check")] for r in runs] == [[False], [False]]


def _weights(s3: S3Server, bucket: str, out: str) -> dict[str, torch.Tensor]:
    key = f"{out}/checkpoints/step-{STEPS:08d}/trainable.safetensors"
    return load_safetensors(read_object(s3, bucket, key))


def _losses(s3: S3Server, bucket: str, out: str) -> list[float]:
    lines = read_object(s3, bucket, f"{out}/metrics.jsonl").decode().splitlines()
    return [json.loads(x)["loss"] for x in lines]


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    name = s3.make_bucket()
    put_images(s3, name, "subject", count=4)
    return name


@pytest.fixture(scope="module")
def single(s3: S3Server, bucket: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    config = tiny_job(s3, bucket, "single", maxSteps=STEPS, batchSize=1, gradientAccumulation=2)
    run = TrainerRun(config, tmp_path_factory.mktemp("single"), s3.env(), extra_env={"OMP_NUM_THREADS": "1"})
    assert run.wait() == 0, run._details()
    return {"weights": _weights(s3, bucket, "single"), "losses": _losses(s3, bucket, "single")}


def _assert_matches_single(single: dict[str, Any], weights: dict[str, torch.Tensor], losses: list[float]) -> None:
    assert set(weights) == set(single["weights"])
    for k, v in single["weights"].items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert len(losses) == STEPS
    assert losses == pytest.approx(single["losses"], rel=1e-4)


def test_two_ranks_train_together_like_one_process_with_the_same_global_batch(
    s3: S3Server, bucket: str, single: dict[str, Any], tmp_path: Path
) -> None:
    config = tiny_job(s3, bucket, "ddp", maxSteps=STEPS, batchSize=1)
    runs = _pair(config, tmp_path, s3, "ddp")
    codes = [r.wait() for r in runs]
    assert codes == [0, 0], [r._details() for r in runs]
    digests = [r.named("training_finished")[0]["trainableDigest"] for r in runs]
    assert digests[0] == digests[1]
    assert runs[0].named("training_started")[0]["worldSize"] == 2
    assert [r.named("training_finished")[0]["rank"] for r in runs] == [0, 1]
    # Rank 0 owns the outputs.
    assert runs[0].termination()["status"] == "succeeded"
    assert not runs[1].termination_path.exists()
    assert runs[1].named("checkpoint_written") == []
    assert [e["step"] for e in runs[0].named("checkpoint_written")] == [4, 8, 10]
    _assert_matches_single(single, _weights(s3, bucket, "ddp"), _losses(s3, bucket, "ddp"))


def test_both_ranks_stop_on_sigterm_and_resume_from_rank0_checkpoint(
    s3: S3Server, bucket: str, single: dict[str, Any], tmp_path: Path
) -> None:
    config = tiny_job(s3, bucket, "ddp-pre", maxSteps=STEPS, batchSize=1)
    first = _pair(config, tmp_path, s3, "first", argv=EXIT_CHECK)
    first[0].wait_event(lambda e: e.get("event") == "step" and e["step"] >= 3, "step 3 on rank 0")
    for r in first:
        r.signal(signal.SIGTERM)
    codes = [r.wait() for r in first]
    assert codes == [12, 12], [r._details() for r in first]
    _left_the_process_group(first)
    assert first[0].named("preempted")[0]["step"] == first[1].named("preempted")[0]["step"]
    stopped = first[0].termination()["lastCheckpoint"]["step"]
    assert 3 <= stopped < STEPS
    assert f"ddp-pre/checkpoints/step-{stopped:08d}/manifest.json" in list_keys(s3, bucket, "ddp-pre/")

    second = _pair(config, tmp_path, s3, "second", argv=EXIT_CHECK)
    codes = [r.wait() for r in second]
    assert codes == [0, 0], [r._details() for r in second]
    _left_the_process_group(second)
    assert [e["step"] for e in second[0].named("resumed")] == [stopped]
    digests = [r.named("training_finished")[0]["trainableDigest"] for r in second]
    assert digests[0] == digests[1]
    _assert_matches_single(single, _weights(s3, bucket, "ddp-pre"), _losses(s3, bucket, "ddp-pre"))


def test_a_signal_to_one_rank_before_training_stops_both_ranks_there(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    """Only rank 1 gets SIGTERM (one node of two preempted) while the base model loads. The ranks agree on stopping
    before training (an all-reduce of the flag), so both exit 12 at once; rank 0 no longer goes on alone into a
    collective that its departed peer never joins (a crash with gloo, a hang with NCCL)."""
    config = tiny_job(s3, bucket, "ddp-setup", maxSteps=STEPS, batchSize=1)
    runs = _pair(config, tmp_path, s3, "setup", argv=EXIT_CHECK)
    runs[1].wait_event(lambda e: e.get("event") == "progress_server", "rank 1's progress server")
    runs[1].signal(signal.SIGTERM)
    codes = [r.wait(timeout=180) for r in runs]
    assert codes == [12, 12], [r._details() for r in runs]
    for r in runs:
        assert r.named("training_started") == []
        assert "before training" in r.named("failed")[0]["message"]
    assert runs[0].termination()["reason"] == "Preempted"
    _left_the_process_group(runs)


def test_one_pod_with_two_local_ranks_stops_on_sigterm_to_its_first_process_and_resumes(
    s3: S3Server, bucket: str, single: dict[str, Any], tmp_path: Path
) -> None:
    """PET_NPROC_PER_NODE=2 in one container: `dreambooth-train` supervises a process per local rank
    (launcher.py). The kubelet signals only the first process; both ranks still stop at the same step, rank 0
    finishes its checkpoint, and the container exits 12. The restarted container resumes and ends like one process.
    """
    env = {
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": "2",
        "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    config = tiny_job(s3, bucket, "local2", maxSteps=STEPS, batchSize=1)
    first = TrainerRun(config, tmp_path / "first", s3.env(), extra_env=env, name="first")
    first.wait_event(lambda e: e.get("event") == "step" and e.get("rank") == 0 and e["step"] >= 3, "step 3 on rank 0")
    first.signal(signal.SIGTERM)
    assert first.wait() == 12, first._details()
    assert sorted(e["localRank"] for e in first.named("rank_exited")) == [0, 1]
    assert {e["exitCode"] for e in first.named("rank_exited")} == {12}
    stopped = first.termination()["lastCheckpoint"]["step"]
    assert 3 <= stopped < STEPS
    assert f"local2/checkpoints/step-{stopped:08d}/manifest.json" in list_keys(s3, bucket, "local2/")

    env["PET_MASTER_PORT"] = str(free_port())
    second = TrainerRun(config, tmp_path / "second", s3.env(), extra_env=env, name="second")
    assert second.wait() == 0, second._details()
    assert second.termination()["status"] == "succeeded"
    assert [e["step"] for e in second.named("resumed") if e["rank"] == 0] == [stopped]
    finished = {e["rank"]: e["trainableDigest"] for e in second.named("training_finished")}
    assert set(finished) == {0, 1}
    assert finished[0] == finished[1]
    _assert_matches_single(single, _weights(s3, bucket, "local2"), _losses(s3, bucket, "local2"))

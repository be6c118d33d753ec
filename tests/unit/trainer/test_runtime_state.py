"""RNG capture/restore, per-step seeding, the resumable sampler, and the distributed env reader."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer import rng
from dreambooth_trainer.distributed import read_env
from dreambooth_trainer.sampler import ResumableSampler


def _draw() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(4).tolist()


def test_capture_restore_continues_every_stream_exactly() -> None:
    rng.seed_all(7)
    _draw()
    state = json.loads(json.dumps(rng.capture()))  # survives JSON, as in state.json
    expected = [_draw() for _ in range(3)]
    rng.seed_all(999)
    _draw()
    rng.restore(state)
    assert [_draw() for _ in range(3)] == expected


def test_seed_step_depends_on_seed_slot_and_step() -> None:
    rng.seed_step(1, 0, 5)
    a = _draw()
    rng.seed_step(1, 0, 5)
    assert _draw() == a
    others = set()
    for args in [(1, 1, 5), (1, 0, 6), (2, 0, 5), (1, 5, 0)]:
        rng.seed_step(*args)
        others.add(_draw()[2][0])
    assert a[2][0] not in others
    assert len(others) == 4


def test_sampler_epochs_are_permutations_and_batches_straddle() -> None:
    s = ResumableSampler(5, 3, seed=3)
    seen = [i for _ in range(5) for i in s.next_batch()]  # 15 positions = 3 epochs
    for e in range(3):
        assert sorted(seen[e * 5 : (e + 1) * 5]) == list(range(5))
    assert seen[:5] != seen[5:10] or seen[5:10] != seen[10:15]  # reshuffled per epoch
    assert s.state_dict() == {"position": 15, "epoch": 3, "index": 0}


def test_sampler_resume_gives_the_same_order() -> None:
    a = ResumableSampler(7, 2, seed=11)
    full = [a.next_batch() for _ in range(10)]
    b = ResumableSampler(7, 2, seed=11)
    head = [b.next_batch() for _ in range(4)]
    c = ResumableSampler(7, 2, seed=11)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert head + [c.next_batch() for _ in range(6)] == full


def test_two_ranks_split_the_global_batch_of_one_process() -> None:
    one = ResumableSampler(6, 4, seed=5)
    r0 = ResumableSampler(6, 2, seed=5, rank=0, world_size=2)
    r1 = ResumableSampler(6, 2, seed=5, rank=1, world_size=2)
    for _ in range(7):
        assert one.next_batch() == r0.next_batch() + r1.next_batch()
    assert r0.state_dict() == r1.state_dict() == one.state_dict()


def test_read_env_from_pet_variables() -> None:
    env = {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "4",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "job-0.svc",
        "PET_MASTER_PORT": "29400",
        "WORLD_SIZE": "8",
    }
    d = read_env(env)
    assert (d.num_nodes, d.procs_per_node, d.node_rank, d.world_size) == (2, 4, 1, 8)
    assert d.lightning_env() == {
        "MASTER_ADDR": "job-0.svc",
        "MASTER_PORT": "29400",
        "NODE_RANK": "1",
        "WORLD_SIZE": "8",
    }
    assert not read_env({}).is_distributed


@pytest.mark.parametrize(
    "env",
    [
        {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "2"},
        {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "WORLD_SIZE": "3"},
        {"PET_NNODES": "x"},
    ],
)
def test_read_env_rejects_inconsistent_settings(env: dict[str, str]) -> None:
    with pytest.raises(InvalidInputError):
        read_env(env)

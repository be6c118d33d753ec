"""The class-prior cache: content-addressed keys, reuse, completing a partial set, rank split, cached latents."""

from __future__ import annotations

import json
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dreambooth_api.config import BaseModelSpec, JobConfig, PriorPreservationSpec
from dreambooth_api.exitcodes import ExitCode, StoppedError
from dreambooth_trainer.cli import classify
from dreambooth_trainer.components import Components, load_components
from dreambooth_trainer.priors import (
    CLASS_IMAGES_GENERATED,
    class_cache_key,
    class_cache_uri,
    class_latents,
    existing_indices,
    generate_class_images,
    image_uri,
    latents_uri,
    load_class_images,
    walk_order,
)
from dreambooth_trainer.storage import ObjectStore

RES = 32
TINY = BaseModelSpec(tiny=True)
# The tiny model is cached by config hash, so test files share one build.
SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"


@pytest.fixture(scope="module")
def comps() -> Components:
    return load_components(TINY, ObjectStore(), SHARED_MODELS)


def prior(**kw: object) -> PriorPreservationSpec:
    data = {"enabled": True, "classPrompt": "a photo of dog", "numImages": 3, "steps": 2, **kw}
    return PriorPreservationSpec.model_validate(data)


def generated_total() -> float:
    return CLASS_IMAGES_GENERATED._value.get()


def test_key_covers_what_changes_the_images() -> None:
    base = class_cache_key(TINY, prior(), RES)
    assert base == class_cache_key(TINY, prior(), RES)
    assert base == class_cache_key(TINY, prior(numImages=50), RES)  # the count is not part of the key
    others = {
        class_cache_key(TINY, prior(classPrompt="a photo of cat"), RES),
        class_cache_key(TINY, prior(), 64),
        class_cache_key(TINY, prior(sampler="euler"), RES),
        class_cache_key(TINY, prior(steps=3), RES),
        class_cache_key(TINY, prior(guidanceScale=1.0), RES),
        class_cache_key(TINY, prior(seed=1), RES),
        class_cache_key(BaseModelSpec(id="org/model"), prior(), RES),
        class_cache_key(BaseModelSpec(id="org/model", revision="abc"), prior(), RES),
        class_cache_key(BaseModelSpec(id="org/model"), prior(), RES, "hub:org/model@" + "1" * 40),
        class_cache_key(BaseModelSpec(uri="s3://bkt/sd"), prior(), RES, "uri:s3://bkt/sd#digest1"),
        class_cache_key(BaseModelSpec(uri="s3://bkt/sd"), prior(), RES, "uri:s3://bkt/sd#digest2"),
    }
    assert base not in others
    assert len(others) == 11
    # the resolved commit, not the branch name, identifies a hub model: main and its commit share one set
    commit = "2" * 40
    main = BaseModelSpec(id="org/model", revision="main")
    pinned = BaseModelSpec(id="org/model", revision=commit)
    assert class_cache_key(main, prior(), RES, main.cache_identity(commit)) == class_cache_key(
        pinned, prior(), RES, pinned.cache_identity(commit)
    )


def test_the_key_follows_the_loaded_weights(comps: Components, tmp_path: Path) -> None:
    store = ObjectStore()
    root = (tmp_path / "cache").as_uri()
    base = BaseModelSpec(id="org/model")
    old = generate_class_images(
        replace(comps, identity="hub:org/model@" + "1" * 40), base, prior(numImages=1), RES, store, root
    )
    new = generate_class_images(
        replace(comps, identity="hub:org/model@" + "2" * 40), base, prior(numImages=1), RES, store, root
    )
    assert old.uri != new.uri
    assert new.generated == 1
    meta = json.loads(store.read_bytes(new.uri + "/meta.json"))
    assert meta["model"] == "hub:org/model@" + "2" * 40


def test_default_cache_location_is_beside_the_output() -> None:
    cfg = JobConfig.model_validate(
        {
            "instanceImages": {"uri": "s3://bkt/in", "prompt": "a photo of sks dog"},
            "output": {"uri": "s3://bkt/jobs/j1"},
            "priorPreservation": prior().to_wire(),
            "training": {"resolution": RES},
        }
    )
    assert class_cache_uri(cfg) == f"s3://bkt/jobs/class-cache/{class_cache_key(TINY, prior(), RES)}"


def test_reuse_completion_and_other_prompt(comps: Components, tmp_path: Path) -> None:
    store = ObjectStore()
    root = (tmp_path / "cache").as_uri()
    spec = prior(numImages=3)
    start = generated_total()
    first = generate_class_images(comps, TINY, spec, RES, store, root)
    assert first.generated == 3
    assert generated_total() - start == 3
    assert existing_indices(store, first.uri) == {0, 1, 2}
    original = store.read_bytes(image_uri(first.uri, 1))

    # second run: everything is reused
    again = generate_class_images(comps, TINY, spec, RES, store, root)
    assert (again.generated, again.reused) == (0, 3)
    assert generated_total() - start == 3

    # a partial cache (one image lost) and a bigger count: only the missing indices are generated
    store.delete(image_uri(first.uri, 0))
    more = generate_class_images(comps, TINY, prior(numImages=5), RES, store, root)
    assert (more.generated, more.reused) == (3, 2)
    assert generated_total() - start == 6
    assert existing_indices(store, first.uri) == {0, 1, 2, 3, 4}
    assert store.read_bytes(image_uri(first.uri, 1)) == original  # untouched
    # image i depends only on seed + i (not on its batch): a fresh set's image 0 matches the regenerated one
    fresh_root = (tmp_path / "fresh").as_uri()
    fresh = generate_class_images(comps, TINY, prior(numImages=1), RES, store, fresh_root)
    (_, a), (_, b) = load_class_images(store, fresh.uri, 1)[0], load_class_images(store, first.uri, 1)[0]
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2

    # a different class prompt gets its own set
    cat = generate_class_images(comps, TINY, prior(classPrompt="a photo of cat", numImages=2), RES, store, root)
    assert cat.uri != first.uri
    assert cat.generated == 2
    images = load_class_images(store, first.uri, 5)
    assert [img.size for _, img in images] == [(RES, RES)] * 5


def test_ranks_split_the_work(comps: Components, tmp_path: Path) -> None:
    store = ObjectStore()
    root = (tmp_path / "cache").as_uri()
    spec = prior(numImages=5)
    r1 = generate_class_images(comps, TINY, spec, RES, store, root, rank=1, world_size=2)
    assert r1.generated == 2
    assert existing_indices(store, r1.uri) == {1, 3}
    r0 = generate_class_images(comps, TINY, spec, RES, store, root, rank=0, world_size=2)
    assert r0.generated == 3
    assert existing_indices(store, r0.uri) == {0, 1, 2, 3, 4}


def test_meta_is_written_by_whichever_rank_generates(comps: Components, tmp_path: Path) -> None:
    store = ObjectStore()
    root = (tmp_path / "cache").as_uri()
    spec = prior(numImages=4)
    r0 = generate_class_images(comps, TINY, spec, RES, store, root, rank=0, world_size=2)
    store.delete(r0.uri + "/meta.json")
    # only odd indices are missing now: rank 0 has nothing to do, rank 1 fills the set and records it
    assert generate_class_images(comps, TINY, spec, RES, store, root, rank=0, world_size=2).generated == 0
    assert generate_class_images(comps, TINY, spec, RES, store, root, rank=1, world_size=2).generated == 2
    assert json.loads(store.read_bytes(r0.uri + "/meta.json"))["classPrompt"] == "a photo of dog"


def test_nothing_to_generate_calls_no_setup(comps: Components, tmp_path: Path) -> None:
    store = ObjectStore()
    root = (tmp_path / "cache").as_uri()
    calls: list[int] = []
    generate_class_images(comps, TINY, prior(numImages=2), RES, store, root, before_generating=lambda: calls.append(1))
    assert calls == [1]  # once, however many batches
    generate_class_images(comps, TINY, prior(numImages=2), RES, store, root, before_generating=lambda: calls.append(1))
    assert calls == [1]


def test_a_preemption_signal_stops_generation_between_batches(comps: Components, tmp_path: Path) -> None:
    """SIGTERM during class-image generation ends it before the next batch (exit 12), keeping what was written."""
    store = ObjectStore()
    root = (tmp_path / "cache").as_uri()
    asked: list[int] = []

    def after_one_batch() -> bool:
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(StoppedError, match="class images") as raised:
        generate_class_images(
            comps, TINY, prior(numImages=3), RES, store, root, batch_size=1, should_stop=after_one_batch
        )
    assert classify(raised.value) == (ExitCode.PREEMPTED, "Preempted")
    again = generate_class_images(comps, TINY, prior(numImages=3), RES, store, root, batch_size=1)
    assert (again.reused, again.generated) == (1, 2)


def job_walking(order: list[int]) -> str:
    """A job name whose walk over six indices is `order` (the walk is a stable hash of the name)."""
    return next(f"ns/job-{n}" for n in range(10_000) if walk_order(list(range(6)), f"ns/job-{n}") == order)


def test_concurrent_jobs_share_the_work(comps: Components, tmp_path: Path) -> None:
    """Two jobs filling the same set at once generate each image about once (the old code generated it twice)."""
    store = ObjectStore()
    root = (tmp_path / "cache").as_uri()
    spec = prior(numImages=6)
    jobs = [job_walking([0, 1, 2, 3, 4, 5]), job_walking([3, 2, 1, 0, 5, 4])]
    start = threading.Barrier(2)

    def run(job: str) -> int:
        start.wait()
        return generate_class_images(comps, TINY, spec, RES, store, root, batch_size=1, job=job).generated

    with ThreadPoolExecutor(2) as pool:
        generated = list(pool.map(run, jobs))
    prefix = generate_class_images(comps, TINY, spec, RES, store, root).uri
    assert existing_indices(store, prefix) == set(range(6))
    # each job may repeat at most the batch it had in flight when they met (twice: in the middle and at the end)
    assert sum(generated) <= 6 + 2, generated


def test_latents_are_cached_beside_the_images(comps: Components, tmp_path: Path) -> None:
    store = ObjectStore()
    spec = prior(numImages=2)
    result = generate_class_images(comps, TINY, spec, RES, store, (tmp_path / "cache").as_uri())
    images = [img for _, img in load_class_images(store, result.uri, 2)]
    latents = class_latents(store, result.uri, images, comps.vae, RES)
    assert store.exists(latents_uri(result.uri, RES))
    assert latents[0].shape == (8, RES // 2, RES // 2)

    # a second call reads the file instead of encoding: a VAE that fails proves it is not used
    class Broken:
        def parameters(self) -> object:
            return iter([torch.zeros(1)])

        def encode(self, *_: object) -> object:
            raise AssertionError("encoded again")

    again = class_latents(store, result.uri, images, Broken(), RES)
    torch.testing.assert_close(again[1], latents[1])

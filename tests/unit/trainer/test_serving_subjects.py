"""LoRA subjects on the tiny model: two subjects (adapters written as a LoRA job exports them) give different images
for one seed; a burst mixing them matches their unbatched results (batches group requests by adapter, so no request
sees another's weights); with an LRU of one, alternating subjects shows loads and evictions in /metrics; the
subjects file and the adapter prefix publish new subjects without a restart."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from serving_support import PROMPT, TOLERANCE, client, config, lora_subject, max_diff, pixels, running, sample

from dreambooth_trainer.serving.server import Server
from dreambooth_trainer.serving.subjects import MISS_SECONDS


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("subjects")


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[Server]:
    subjects = root / "subjects.json"
    subjects.write_text(json.dumps({"alice": lora_subject(root, 1).as_uri(), "bob": lora_subject(root, 2).as_uri()}))
    (root / "jobs").mkdir()
    cfg = config(
        subjectsFile=str(subjects),
        adapterPrefix=(root / "jobs").as_uri(),
        server={"maxBatchSize": 8, "maxBatchDelayMs": 1000, "maxLoadedAdapters": 1},
    )
    with running(cfg, root / "work") as srv:
        yield srv


def generate(srv: Server, model: str | None, seed: int) -> Any:
    kwargs: dict[str, Any] = {"model": model} if model else {}
    answer = client(srv, timeout=120).images.generate(prompt=PROMPT, size="32x32", extra_body={"seed": seed}, **kwargs)
    return pixels((answer.data or [])[0].b64_json)


def metrics_text(srv: Server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=30) as response:
        return str(response.read().decode())


def test_subjects_differ_and_a_mixed_burst_matches_unbatched_results(server: Server) -> None:
    server.engine.max_delay = 0.0
    alone = {model: generate(server, model, 5) for model in ("alice", "bob", None)}
    assert max_diff(alone["alice"], alone["bob"]) > 10
    assert max_diff(alone["alice"], alone[None]) > 10
    assert max_diff(alone["bob"], alone[None]) > 10

    server.engine.max_delay = 1.0
    requests_before = sample("dreambooth_serve_batch_requests_count")
    burst = ["alice", "bob", None] * 4
    with ThreadPoolExecutor(len(burst)) as pool:
        images = list(pool.map(lambda m: generate(server, m, 5), burst))
    for model, image in zip(burst, images, strict=True):
        assert max_diff(image, alone[model]) <= TOLERANCE, model
    calls = sample("dreambooth_serve_batch_requests_count") - requests_before
    assert 3 <= calls < len(burst), f"{len(burst)} requests of 3 adapter sets ran in {calls} pipeline calls"


def test_lru_of_one_loads_and_evicts_alternating_subjects(server: Server) -> None:
    server.engine.max_delay = 0.0
    loads, evictions, hits = (sample(f"dreambooth_serve_adapter_{m}_total") for m in ("loads", "evictions", "hits"))
    first, second = ("bob", "alice") if server.adapters.loaded() == ["alice"] else ("alice", "bob")
    for model in (first, second, first, second, second):
        generate(server, model, 1)
    assert sample("dreambooth_serve_adapter_loads_total") - loads >= 4
    assert sample("dreambooth_serve_adapter_evictions_total") - evictions >= 3
    assert sample("dreambooth_serve_adapter_hits_total") - hits >= 1
    assert server.adapters.loaded() == [second]
    text = metrics_text(server)
    for name in ("loads_total", "evictions_total", "hits_total", "load_seconds_count", "switch_seconds_count"):
        assert f"dreambooth_serve_adapter_{name}" in text
    assert "dreambooth_serve_adapters_loaded 1.0" in text


def test_subjects_file_and_prefix_publish_new_subjects_without_a_restart(server: Server, root: Path) -> None:
    server.engine.max_delay = 0.0
    api = client(server, timeout=120)
    with pytest.raises(openai.NotFoundError):
        api.images.generate(prompt=PROMPT, model="carol", size="32x32")
    subjects = root / "subjects.json"
    doc = json.loads(subjects.read_text())
    staged = root / "subjects.json.new"
    staged.write_text(json.dumps({**doc, "carol": lora_subject(root, 3).as_uri()}))
    staged.replace(subjects)  # as a ConfigMap volume's update: a new file in place
    assert "carol" in [m.id for m in api.models.list()]
    carol = generate(server, "carol", 5)
    assert max_diff(carol, generate(server, "alice", 5)) > 10

    # A job's LoRA export appearing under the prefix (<prefix>/<job>/lora/) is servable by the job's name.
    with pytest.raises(openai.NotFoundError):
        api.images.generate(prompt=PROMPT, model="dave", size="32x32")
    export = root / "jobs" / "dave" / "lora"
    export.mkdir(parents=True)
    shutil.copy(lora_subject(root, 4) / "pytorch_lora_weights.safetensors", export)
    time.sleep(MISS_SECONDS)  # a name not found is asked again after this long
    assert max_diff(generate(server, "dave", 5), carol) > 10
    assert [m.id for m in api.models.list()] == ["base", "alice", "bob", "carol", "dave"]
    # Mixing: the adapters extension takes name -> weight; a subject at weight 0 is the base model.
    mixed = client(server).images.generate(
        prompt=PROMPT, size="32x32", extra_body={"seed": 5, "adapters": {"alice": 0.0}}
    )
    assert max_diff(pixels((mixed.data or [])[0].b64_json), generate(server, None, 5)) <= TOLERANCE


def test_a_subject_whose_weights_are_gone_is_404(server: Server, root: Path) -> None:
    server.engine.max_delay = 0.0
    subjects = root / "subjects.json"
    doc = json.loads(subjects.read_text())
    staged = root / "subjects.json.new"
    staged.write_text(json.dumps({**doc, "erin": (root / "nowhere").as_uri()}))
    staged.replace(subjects)
    with pytest.raises(openai.NotFoundError) as caught:
        client(server).images.generate(prompt=PROMPT, model="erin", size="32x32")
    assert "no LoRA weights" in caught.value.message
    assert generate(server, "alice", 1).shape == (32, 32, 3)  # the server goes on


def test_a_subject_whose_weights_do_not_load_is_500_until_they_are_fixed(server: Server, root: Path) -> None:
    """A failed load forgets the download: once the weights in storage are good again, the next request downloads
    and serves them (the failed folder was reused before, and the subject failed until the pod restarted)."""
    server.engine.max_delay = 0.0
    good = lora_subject(root, 3)
    stored = root / "frank"
    shutil.copytree(good, stored)
    (weights,) = stored.glob("*.safetensors")
    weights.write_bytes(b"not a safetensors file")
    subjects = root / "subjects.json"
    staged = root / "subjects.json.new"
    staged.write_text(json.dumps({**json.loads(subjects.read_text()), "frank": stored.as_uri()}))
    staged.replace(subjects)
    for _ in range(2):  # the same answer again: nothing half-loaded stays behind
        with pytest.raises(openai.InternalServerError) as caught:
            client(server, timeout=120).images.generate(prompt=PROMPT, model="frank", size="32x32")
        assert "adapter_load_failed" in str(caught.value.body), caught.value.body
    shutil.copyfile(next(good.glob("*.safetensors")), weights)
    assert generate(server, "frank", 1).shape == (32, 32, 3)

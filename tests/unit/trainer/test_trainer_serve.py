"""The sampling server's start-up on the tiny model: the three kinds of modelUri a job exports (diffusers folder,
single file, LoRA weights on the base model) serve the same merged model at the training resolution; a folder of
ours missing a file its manifest lists is refused (a foreign folder without a manifest is served); a failed load
exits 1 with the error in the termination message; flags and the environment; an empty token; the drain."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from serving_support import LIMITS, PROMPT, SHARED_MODELS, client, config, max_diff, pixels, running

from dreambooth_api import env
from dreambooth_api.config import BaseModelSpec, JobConfig
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.components import load_components
from dreambooth_trainer.export import export_model
from dreambooth_trainer.export.manifest import MANIFEST_NAME
from dreambooth_trainer.module import DreamBoothModule
from dreambooth_trainer.result import TERMINATION_ENV
from dreambooth_trainer.serving.config import launch, load_serve_config, read_token
from dreambooth_trainer.serving.server import Server, main, serve
from dreambooth_trainer.storage import ObjectStore

TRAINED_AT = 64  # the tiny model's own size is 32: the server must default to the training resolution


@pytest.fixture(autouse=True)
def _shared_base_models(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """baseModel: {tiny: true} from the machine's shared build (the model cache, as the operator's volume)."""
    cache = tmp_path_factory.getbasetemp() / "model-cache"
    if not (cache / "models").exists():
        cache.mkdir(exist_ok=True)
        (cache / "models").symlink_to(SHARED_MODELS)
    monkeypatch.setenv(env.MODEL_CACHE_DIR, str(cache))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA job's outputs (diffusers folder, single file, LoRA weights; trained at 64 px) under `<root>/out`."""
    root = tmp_path_factory.mktemp("serve")
    config = JobConfig.model_validate(
        {
            "name": "serve-test",
            "instanceImages": {"uri": "file:///unused", "prompt": PROMPT},
            "training": {"method": "lora", "resolution": TRAINED_AT},
            "output": {"uri": (root / "out").as_uri(), "formats": ["diffusers", "safetensors", "lora"]},
        }
    )
    comps = load_components(BaseModelSpec(tiny=True), ObjectStore(), SHARED_MODELS)
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: the same adapters every run
    module = DreamBoothModule(comps, config.training)
    with torch.no_grad():
        for name, param in module.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    export_model(module, config, ObjectStore(), root / "work", steps=1)
    return root / "out"


def served(doc: dict[str, Any], _workdir: Path) -> Any:
    return load_serve_config(json.dumps({**doc, "server": LIMITS}))


def image(srv: Server, size: str | None = "32x32") -> np.ndarray[Any, Any]:
    extra = {"size": size} if size else {}
    answer = client(srv).images.generate(prompt=PROMPT, extra_body={"seed": 5}, **extra)
    return pixels((answer.data or [])[0].b64_json)


def test_the_three_kinds_of_model_uri_serve_the_same_model(exported: Path, tmp_path: Path) -> None:
    with running(served({"modelUri": (exported / "model").as_uri()}, tmp_path), tmp_path / "a") as srv:
        merged = image(srv)
        assert image(srv, None).shape == (TRAINED_AT, TRAINED_AT, 3)  # the manifest's training resolution
    base = {"baseModel": {"tiny": True}}
    single_uri = (exported / "model.safetensors").as_uri()
    with running(served({**base, "modelUri": single_uri}, tmp_path), tmp_path / "b") as srv:
        assert max_diff(image(srv), merged) <= 1
        assert image(srv, None).shape == (TRAINED_AT, TRAINED_AT, 3)  # from the single file's metadata
    lora_uri = (exported / "lora" / "pytorch_lora_weights.safetensors").as_uri()
    with running(served({**base, "modelUri": lora_uri}, tmp_path), tmp_path / "c") as srv:
        assert max_diff(image(srv), merged) <= 2  # the LoRA modelUri is always on
    with running(served(base, tmp_path), tmp_path / "d") as srv:
        assert max_diff(image(srv), merged) > 2  # the adapters matter: the comparisons above are not vacuous


def test_an_incomplete_folder_of_ours_is_refused_and_a_foreign_one_served(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(exported / "model", broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    monkeypatch.setenv(TERMINATION_ENV, str(tmp_path / "termination-log"))
    srv = Server(served({"modelUri": broken.as_uri()}, tmp_path), "127.0.0.1", 0, workdir=tmp_path / "w1")
    assert serve(srv) == 1
    doc = json.loads((tmp_path / "termination-log").read_text())
    assert doc["reason"] == "ModelLoadFailed"
    assert "IncompleteModelError" in doc["message"]
    assert "missing unet/diffusion_pytorch_model.safetensors" in doc["message"]

    foreign = tmp_path / "foreign"
    shutil.copytree(exported / "model", foreign)
    (foreign / MANIFEST_NAME).unlink()  # a diffusers folder from elsewhere: no manifest, taken as it is
    with running(served({"modelUri": foreign.as_uri()}, tmp_path), tmp_path / "w2") as srv:
        assert image(srv).shape == (32, 32, 3)
        assert image(srv, None).shape == (32, 32, 3)  # no manifest: the UNet's own size


def test_a_failed_load_exits_1_with_the_error_in_the_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TERMINATION_ENV, str(tmp_path / "termination-log"))
    srv = Server(load_serve_config(json.dumps({"modelUri": (tmp_path / "missing").as_uri()})), workdir=tmp_path)
    assert serve(srv) == 1
    assert srv.lifecycle.phase == "failed"
    doc = json.loads((tmp_path / "termination-log").read_text())
    assert doc == {"status": "failed", "reason": "ModelLoadFailed", "message": srv.lifecycle.error}
    assert "missing" in doc["message"]


def test_flags_on_top_of_the_environment() -> None:
    environ = {
        env.SERVE_CONFIG: json.dumps({"modelUri": "s3://bkt/m/model", "server": {"maxSteps": 30}}),
        env.BIND_ADDRESS: "10.0.0.7",
        env.SERVE_PORT: "9000",
    }
    settings = launch([], environ)
    assert (settings.config.model_uri, settings.host, settings.port, settings.token) == (
        "s3://bkt/m/model",
        "10.0.0.7",
        9000,
        None,
    )
    settings = launch(
        [
            "--base-model",
            "tiny",
            "--adapter",
            "dog=s3://bkt/dog/lora",
            "--adapter",
            "cat=file:///c/lora@0.5",
            "--adapter-prefix",
            "s3://bkt/jobs/",
            "--port",
            "8001",
            "--max-batch-size",
            "8",
        ],
        environ,
    )
    c = settings.config
    assert c.model_uri is None  # --base-model replaces the environment's model
    assert c.base_model is not None
    assert c.base_model.tiny
    assert [(a.name, a.uri, a.weight) for a in c.adapters] == [
        ("dog", "s3://bkt/dog/lora", 1.0),
        ("cat", "file:///c/lora", 0.5),
    ]
    assert (c.adapter_prefix, c.server.max_batch_size, c.server.max_steps, settings.port) == (
        "s3://bkt/jobs/",
        8,
        30,
        8001,
    )
    with pytest.raises(InvalidInputError, match="no server config"):
        launch([], {})
    with pytest.raises(InvalidInputError, match=r"server\.defaultSteps may not exceed server\.maxSteps"):
        launch([], {env.SERVE_CONFIG: json.dumps({"baseModel": {"tiny": True}, "server": {"maxSteps": 10}})})
    with pytest.raises(SystemExit):
        launch(["--adapter", "no-uri"], {})


def test_an_empty_token_is_an_error_not_auth_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_token({}) is None
    assert read_token({env.SERVE_TOKEN: " t0k "}) == "t0k"
    for empty in ("", "  \n"):
        with pytest.raises(InvalidInputError, match="set but empty"):
            read_token({env.SERVE_TOKEN: empty})
    monkeypatch.setenv(TERMINATION_ENV, str(tmp_path / "termination-log"))
    monkeypatch.setenv(env.SERVE_TOKEN, "")
    monkeypatch.setenv(env.SERVE_CONFIG, json.dumps({"baseModel": {"tiny": True}}))
    assert main([]) == 1
    doc = json.loads((tmp_path / "termination-log").read_text())
    assert doc["reason"] == "InvalidConfig"
    assert env.SERVE_TOKEN in doc["message"]


def test_drain_finishes_requests_in_flight(tmp_path: Path) -> None:
    entered, release = threading.Event(), threading.Event()
    with running(config(), tmp_path) as srv:

        def slow(sampling: Any, samples: Any, stop: Any = None) -> list[Any]:
            entered.set()
            assert release.wait(60)
            return [Image.new("RGB", (sampling.width, sampling.height)) for _ in samples]

        srv.runner.generate = slow  # type: ignore[method-assign]
        answers: list[Any] = []
        thread = threading.Thread(target=lambda: answers.append(image(srv)))
        thread.start()
        assert entered.wait(60)
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        time.sleep(0.5)
        assert srv.lifecycle.phase == "draining"
        release.set()
        thread.join(60)
        stopper.join(60)
    assert len(answers) == 1
    assert answers[0].shape == (32, 32, 3)

"""The sampling server on the tiny model: PNG and JSON answers, fixed seeds, LoRA adapters, limits, auth, metrics."""

from __future__ import annotations

import base64
import json
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dreambooth_trainer.components import load_components
from dreambooth_trainer.config import BaseModelSpec, TrainingConfig
from dreambooth_trainer.export import write_diffusers, write_lora
from dreambooth_trainer.module import DreamBoothModule
from dreambooth_trainer.serve import TOKEN_ENV, Server, load_serve_config
from dreambooth_trainer.storage import ObjectStore

# The tiny model is cached by config hash, so test files share one build.
SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    comps = load_components(BaseModelSpec(tiny=True), ObjectStore(), SHARED_MODELS)
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: the same adapters every run
    module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32))
    with torch.no_grad():
        for name, param in module.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    write_diffusers(module, root / "store" / "model", torch.float32)  # the merged model
    write_lora(module, root / "store" / "lora", torch.float32)
    config = load_serve_config(
        json.dumps(
            {
                "baseModel": {"tiny": True},
                "adapters": [{"name": "subject", "uri": (root / "store" / "lora").as_uri(), "weight": 1.0}],
                "server": {
                    "maxSteps": 4,
                    "defaultSteps": 2,
                    "maxResolution": 64,
                    "maxImagesPerRequest": 3,
                    "maxBatchSize": 2,
                    "defaultScheduler": "ddim",
                },
            }
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        srv = Server(config, "127.0.0.1", 0, workdir=root / "work")
    srv.start()
    assert srv.wait_loaded(120) == "ready", srv.error
    yield srv
    srv.stop()


def call(
    srv: Server, path: str, body: dict[str, Any] | None = None, token: str | None = TOKEN
) -> tuple[int, bytes, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", data=data, method="POST" if body else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - an http:// URL built above
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def test_health_png_and_fixed_seed(server: Server) -> None:
    assert call(server, "/healthz")[0] == 200
    code, body, ctype = call(server, "/generate", {"prompt": "a photo of sks dog", "seed": 3})
    assert (code, ctype) == (200, "image/png")
    assert body.startswith(b"\x89PNG")
    assert call(server, "/generate", {"prompt": "a photo of sks dog", "seed": 3})[1] == body
    assert call(server, "/generate", {"prompt": "a photo of sks dog", "seed": 4})[1] != body


def test_json_many_images_and_adapter_choice(server: Server) -> None:
    req = {"prompt": "a photo of sks dog", "seed": 1, "numImages": 3, "format": "json", "width": 32, "height": 32}
    code, body, _ = call(server, "/generate", req)
    assert code == 200
    doc = json.loads(body)
    assert doc["seed"] == 1
    images = [base64.b64decode(i) for i in doc["images"]]
    assert len(images) == 3
    assert len(set(images)) == 3
    off = json.loads(call(server, "/generate", {**req, "adapters": {"subject": 0.0}})[1])["images"]
    assert off[0] != doc["images"][0]  # the adapter changes the output
    on = json.loads(call(server, "/generate", {**req, "adapters": {"subject": 1.0}})[1])["images"]
    assert on[0] == doc["images"][0]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"prompt": "x", "steps": 5}, "steps may not exceed 4"),
        ({"prompt": "x", "width": 128}, "width may not exceed 64"),
        ({"prompt": "x", "numImages": 4}, "numImages may not exceed 3"),
        ({"prompt": "x", "adapters": {"nope": 1.0}}, "unknown adapters"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "width": 30}, "multiple of 8"),
    ],
)
def test_limits_are_enforced(server: Server, body: dict[str, Any], match: str) -> None:
    code, raw, _ = call(server, "/generate", body)
    assert code == 400
    assert match in json.loads(raw)["error"]


def test_auth_and_metrics(server: Server) -> None:
    assert call(server, "/generate", {"prompt": "x"}, token=None)[0] == 401
    assert call(server, "/generate", {"prompt": "x"}, token="wrong")[0] == 401
    code, body, _ = call(server, "/metrics")
    assert code == 200
    text = body.decode()
    assert 'dreambooth_serve_requests_total{code="401"}' in text
    assert "dreambooth_serve_images_generated_total" in text
    assert "dreambooth_serve_ready 1.0" in text

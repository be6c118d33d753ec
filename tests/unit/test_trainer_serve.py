"""The sampling server on the tiny model: PNG and JSON answers, fixed seeds, LoRA adapters, limits, auth, metrics;
the three kinds of modelUri, a failed load, errors while generating, keep-alive and draining."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY

from dreambooth_api.config import BaseModelSpec, TrainingConfig
from dreambooth_api.env import SERVE_TOKEN as TOKEN_ENV
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.components import load_components
from dreambooth_trainer.export import export_parts, write_diffusers, write_lora, write_single_file
from dreambooth_trainer.module import DreamBoothModule
from dreambooth_trainer.result import TERMINATION_ENV
from dreambooth_trainer.serving.protocol import GenerateRequest, content_length, load_serve_config, token_matches
from dreambooth_trainer.serving.runner import ModelRunner
from dreambooth_trainer.serving.server import Server, serve
from dreambooth_trainer.storage import ObjectStore

# The tiny model is cached by config hash, so test files share one build.
SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained LoRA module's exports: `model` (diffusers, merged), `model.safetensors` (merged), `lora`."""
    root = tmp_path_factory.mktemp("serve")
    comps = load_components(BaseModelSpec(tiny=True), ObjectStore(), SHARED_MODELS)
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: the same adapters every run
    module = DreamBoothModule(comps, TrainingConfig(method="lora", resolution=32))
    with torch.no_grad():
        for name, param in module.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    write_diffusers(module, root / "store" / "model", torch.float32)  # the merged model
    parts = export_parts(module, None)
    write_single_file(parts.unet, parts.vae, parts.text_encoder, root / "store" / "model.safetensors", torch.float32)
    write_lora(module, root / "store" / "lora", torch.float32)
    return root


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[Server]:
    root = store
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
    assert "dreambooth_serve_ready 1.0" in text
    before = REGISTRY.get_sample_value("dreambooth_serve_images_generated_total") or 0.0
    req = {"prompt": "x", "numImages": 2, "format": "json", "width": 32, "height": 32}
    assert call(server, "/generate", req)[0] == 200
    assert REGISTRY.get_sample_value("dreambooth_serve_images_generated_total") == before + 2


def served(config: dict[str, Any], workdir: Path) -> Server:
    srv = Server(load_serve_config(json.dumps(config)), "127.0.0.1", 0, workdir=workdir)
    srv.start()
    assert srv.wait_loaded(120) == "ready", srv.error
    return srv


def pixels(srv: Server) -> np.ndarray[Any, Any]:
    req = GenerateRequest(prompt="a photo of sks dog", seed=5, steps=2, width=32, height=32)
    images, _ = srv.sampler.generate(req)
    srv.stop()
    return np.asarray(images[0], dtype=np.int16)


def test_model_uris_diffusers_single_file_and_lora(store: Path, tmp_path: Path) -> None:
    """Each kind of job output serves the same merged model; a user adapter may be named `model`."""
    files = store / "store"
    merged = pixels(served({"modelUri": (files / "model").as_uri()}, tmp_path / "a"))
    base = {"baseModel": {"tiny": True}}
    single = pixels(served({**base, "modelUri": (files / "model.safetensors").as_uri()}, tmp_path / "b"))
    assert np.abs(single - merged).max() <= 1
    lora_file = (files / "lora" / "pytorch_lora_weights.safetensors").as_uri()
    clash = [{"name": "model", "uri": (files / "lora").as_uri(), "weight": 0.0}]
    srv = served({**base, "modelUri": lora_file, "adapters": clash}, tmp_path / "c")
    assert srv.sampler.check(GenerateRequest(prompt="x", adapters={"model": 0.0})) is None
    assert np.abs(pixels(srv) - merged).max() <= 2  # the LoRA modelUri is on, the user's "model" at 0
    plain = pixels(served(base, tmp_path / "d"))
    assert np.abs(plain - merged).max() > 2  # the adapters matter: the comparisons above are not vacuous


def test_failed_load_exits_1_with_the_error_in_the_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TERMINATION_ENV, str(tmp_path / "termination-log"))
    config = load_serve_config(json.dumps({"modelUri": (tmp_path / "missing").as_uri()}))
    srv = Server(config, "127.0.0.1", 0, workdir=tmp_path / "work")
    assert serve(srv, drain_seconds=1) == 1
    assert srv.state == "failed"
    doc = json.loads((tmp_path / "termination-log").read_text())
    assert doc["reason"] == "ModelLoadFailed"
    assert doc["message"] == srv.error
    assert "missing" in doc["message"]


def test_invalid_configs_and_request_values(store: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"server\.defaultSteps may not exceed server\.maxSteps"):
        load_serve_config(json.dumps({"baseModel": {"tiny": True}, "server": {"maxSteps": 10}}))
    with pytest.raises(InvalidInputError, match="maxResolution"):  # the InferenceService's limit: at least 64
        load_serve_config(json.dumps({"baseModel": {"tiny": True}, "server": {"maxResolution": 56}}))
    config = load_serve_config(json.dumps({"baseModel": {"tiny": True}, "server": {"maxResolution": 64}}))
    runner = ModelRunner(config, store / "unused")
    runner.native_size = 128  # the model's own size applies when a request names none
    assert runner.check(GenerateRequest(prompt="x")) == (
        "width may not exceed 64 (the model's native size 128; name a smaller one)"
    )
    assert runner.check(GenerateRequest(prompt="x", width=64, height=64)) is None
    assert (content_length(None), content_length("12"), content_length("-1"), content_length("abc")) == (
        0,
        12,
        None,
        None,
    )
    assert token_matches("Bearer t", "t")
    assert not token_matches("Bearer tt", "t")
    assert not token_matches(None, "t")


@pytest.mark.parametrize("adapters", ['{"subject": NaN}', '{"subject": Infinity}', '{"subject": 10.5}'])
def test_adapter_weights_are_bounded(server: Server, adapters: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = f'{{"prompt": "x", "adapters": {adapters}}}'
    conn.request("POST", "/generate", body=body, headers={"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    assert resp.status == 400
    assert "adapters.subject" in json.loads(resp.read())["error"]


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(65536), b""))


@pytest.mark.parametrize(("length", "status"), [("-1", b"400"), ("abc", b"400"), (str(1 << 20), b"413")])
def test_bad_content_length_is_answered_and_closes(server: Server, length: str, status: bytes) -> None:
    head = f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {length}\r\n\r\n"
    answer = raw(server.port, head.encode() + b'{"prompt": "x"}')
    assert answer.startswith(b"HTTP/1.1 " + status), answer
    assert b"Connection: close" in answer
    assert server.httpd.RequestHandlerClass.timeout == 30  # type: ignore[attr-defined]


def test_keep_alive_survives_early_answers(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    for path, headers, code in [
        ("/generate", {}, 401),
        ("/nope", {"Authorization": f"Bearer {TOKEN}"}, 404),
    ]:
        conn.request("POST", path, body=b'{"prompt": "x"}', headers=headers)
        resp = conn.getresponse()
        assert resp.status == code
        resp.read()
        conn.request("GET", "/healthz")  # the same connection: the unread body must not leak into it
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("error", "code"),
    [(RuntimeError("scheduler broke"), 500), (torch.cuda.OutOfMemoryError("CUDA out of memory"), 503)],
)
def test_generate_errors_answer_json_and_are_counted(
    server: Server, monkeypatch: pytest.MonkeyPatch, error: Exception, code: int
) -> None:
    def boom(req: GenerateRequest) -> tuple[list[Any], int]:
        raise error

    monkeypatch.setattr(server.sampler, "generate", boom)
    metric = "dreambooth_serve_requests_total"
    before = REGISTRY.get_sample_value(metric, {"code": str(code)}) or 0.0
    status, body, ctype = call(server, "/generate", {"prompt": "x"})
    assert (status, ctype) == (code, "application/json")
    assert str(error) in json.loads(body)["error"]
    assert REGISTRY.get_sample_value(metric, {"code": str(code)}) == before + 1


def test_drain_finishes_requests_in_flight_and_stops_accepting(tmp_path: Path) -> None:
    srv = Server(load_serve_config(json.dumps({"baseModel": {"tiny": True}})), "127.0.0.1", 0, workdir=tmp_path)
    srv.state = "ready"  # a stand-in model: generate blocks until released
    entered, release = threading.Event(), threading.Event()

    def slow(req: GenerateRequest) -> tuple[list[Any], int]:
        entered.set()
        assert release.wait(60)
        return [Image.new("RGB", (8, 8))], 0

    srv.sampler.generate = slow  # type: ignore[method-assign]
    threading.Thread(target=srv.httpd.serve_forever, daemon=True).start()
    probe = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    probe.request("GET", "/healthz")
    assert probe.getresponse().read() == b'{"status": "ok"}'
    answers: list[tuple[int, bytes, str]] = []
    client = threading.Thread(target=lambda: answers.append(call(srv, "/generate", {"prompt": "x"}, token=None)))
    client.start()
    assert entered.wait(60)
    assert not srv.drain(0.05)  # one request still in flight
    probe.request("GET", "/healthz")
    resp = probe.getresponse()
    assert (resp.status, json.loads(resp.read())) == (503, {"status": "draining"})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    release.set()
    assert srv.drain(60)
    client.join(60)
    assert answers[0][0] == 200

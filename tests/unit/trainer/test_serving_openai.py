"""The server through the official `openai` client on the tiny model: images.generate and models.list, OpenAI's
error envelope with the status codes the client turns into its exception classes, the limits (each a 400 naming
it), auth before the body is read, the in-flight gauge, and readiness."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from serving_support import PROMPT, client, config, lora_subject, max_diff, pixels, running, sample

from dreambooth_trainer.serving.server import Server

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("openai")
    subjects = root / "subjects.json"
    subjects.write_text(json.dumps({"dog": lora_subject(root, 1).as_uri()}))
    cfg = config(subjectsFile=str(subjects), server={"maxImagesPerRequest": 4, "maxPromptTokens": 20})
    with running(cfg, root / "work", token=TOKEN) as srv:
        yield srv


def test_generate_and_list_models_with_the_official_client(server: Server) -> None:
    api = client(server, TOKEN)
    assert [m.id for m in api.models.list()] == ["base", "dog"]
    card = api.models.retrieve("dog")
    assert (card.id, card.owned_by, (card.model_extra or {}).get("parent")) == ("dog", "dreambooth", "base")
    answer = api.images.generate(prompt=PROMPT, n=2, size="32x32", extra_body={"seed": 3})
    assert answer.created > 0
    assert len(answer.data or []) == 2
    first, second = answer.data or []
    assert first.revised_prompt is None
    assert (first.model_extra or {}).get("seed") == 3
    assert (second.model_extra or {}).get("seed") == 4
    image = pixels(first.b64_json)
    assert image.shape == (32, 32, 3)
    again = api.images.generate(prompt=PROMPT, size="32x32", extra_body={"seed": 3}).data or []
    assert max_diff(pixels(again[0].b64_json), image) == 0
    assert max_diff(pixels(second.b64_json), image) > 0
    # The default size is the model's native one (the tiny model: 32).
    assert pixels((api.images.generate(prompt=PROMPT, extra_body={"seed": 3}).data or [])[0].b64_json).shape[0] == 32
    subject = api.images.generate(prompt=PROMPT, model="dog", size="32x32", extra_body={"seed": 3}).data or []
    assert max_diff(pixels(subject[0].b64_json), image) > 2
    # The api-key header carries the token too (through the Kubernetes API server's proxy Authorization is removed).
    keyed = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/models", headers={"api-key": TOKEN})
    with urllib.request.urlopen(keyed, timeout=30) as response:  # noqa: S310 - a local URL
        assert [m["id"] for m in json.loads(response.read())["data"]] == ["base", "dog"]


LONG_PROMPT = " ".join(["dog"] * 30)


@pytest.mark.parametrize(
    ("kwargs", "error", "param", "message"),
    [
        ({"n": 5}, openai.BadRequestError, "n", "n=5 exceeds the server's limit maxImagesPerRequest=4"),
        ({"size": "128x128"}, openai.BadRequestError, "size", "maxResolution=64"),
        ({"size": "30x30"}, openai.BadRequestError, "size", "multiples of 8"),
        ({"size": "big"}, openai.BadRequestError, "size", "pattern"),
        ({"extra_body": {"num_inference_steps": 9}}, openai.BadRequestError, "num_inference_steps", "maxSteps=4"),
        ({"prompt": LONG_PROMPT}, openai.BadRequestError, "prompt tokens", "maxPromptTokens=20"),
        ({"extra_body": {"negative_prompt": LONG_PROMPT}}, openai.BadRequestError, "negative_prompt tokens", "20"),
        ({"response_format": "url"}, openai.BadRequestError, "response_format", "b64_json"),
        ({"extra_body": {"guidance": 2}}, openai.BadRequestError, "guidance", "Extra inputs are not permitted"),
        ({"extra_body": {"adapters": {"dog": float("nan")}}}, openai.BadRequestError, None, None),
        ({"extra_body": {"scheduler": "nope"}}, openai.BadRequestError, "scheduler", "ddim"),
        ({"model": "cat"}, openai.NotFoundError, "model", "the model 'cat' does not exist"),
        ({"extra_body": {"adapters": {"cat": 1.0}}}, openai.NotFoundError, "adapters", "adapter 'cat'"),
    ],
)
def test_errors_are_openais_envelope_and_exception_classes(
    server: Server, kwargs: dict[str, Any], error: type[openai.APIStatusError], param: str | None, message: str | None
) -> None:
    api = client(server, TOKEN)
    request = {"prompt": PROMPT, **kwargs}
    if kwargs.get("extra_body", {}).get("adapters", {}).get("dog") is not None:
        # NaN is not JSON: send the body by hand, as a client with allow_nan would.
        status, body = post(server, b'{"prompt": "x", "adapters": {"dog": NaN}}', TOKEN)
        assert status == 400
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return
    with pytest.raises(error) as caught:
        api.images.generate(**request)
    body = caught.value.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["param"] == param
    if message is not None:
        assert message in body["message"]


def post(server: Server, data: bytes, token: str | None, path: str = "/v1/images/generations") -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - a local URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_auth_and_body_size(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, "wrong").models.list()
    assert caught.value.status_code == 401
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "invalid_api_key"
    assert post(server, b'{"prompt": "x"}', None)[0] == 401
    with pytest.raises(openai.APIStatusError) as too_large:
        client(server, TOKEN).images.generate(prompt="x" * 70_000)
    assert too_large.value.status_code == 413
    assert isinstance(too_large.value.body, dict)
    assert too_large.value.body["code"] == "request_too_large"
    # Health, readiness, metrics and the OpenAPI document need no token.
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=30) as response:
            assert response.status == 200


def test_auth_is_checked_before_the_body_and_the_inflight_gauge_counts_only_authenticated(server: Server) -> None:
    """An unauthenticated request is answered 401 from its headers alone (its body never sent), and never shows in
    dreambooth_serve_inflight_requests, the HPA's metric."""
    # The gauge is the process's: a server another test stopped with a request in flight (its event loop gone)
    # never counts that request down, so this test counts from what it finds.
    before = sample("dreambooth_serve_inflight_requests")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401"), answer
        assert sample("dreambooth_serve_inflight_requests") == before
    # An authenticated request in flight is counted while it waits for the model.
    entered, release = threading.Event(), threading.Event()
    real = server.runner.generate

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    server.runner.generate = held  # type: ignore[method-assign]
    try:
        thread = threading.Thread(target=lambda: client(server, TOKEN).images.generate(prompt=PROMPT, size="32x32"))
        thread.start()
        assert entered.wait(60)
        assert sample("dreambooth_serve_inflight_requests") == before + 1
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").images.generate(prompt=PROMPT)
        assert sample("dreambooth_serve_inflight_requests") == before + 1
    finally:
        release.set()
        server.runner.generate = real  # type: ignore[method-assign]
    thread.join(60)
    assert sample("dreambooth_serve_inflight_requests") == before


def test_not_ready_is_503_with_retry_after(tmp_path: Path) -> None:
    release = threading.Event()
    srv = Server(config(), "127.0.0.1", 0, workdir=tmp_path)
    real = srv.runner.load
    srv.runner.load = lambda: (release.wait(60), real())[1]  # type: ignore[method-assign]
    srv.start()
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            client(srv).images.generate(prompt=PROMPT)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["Retry-After"] == "2"
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "not_ready"
        assert status_of(srv, "/healthz") == (503, {"status": "loading"})  # a startup probe waits
        assert status_of(srv, "/readyz") == (503, {"status": "loading"})
        release.set()
        assert srv.wait_loaded(120) == "ready"
        assert status_of(srv, "/readyz") == (200, {"status": "ready"})
    finally:
        release.set()
        srv.stop()


def status_of(srv: Server, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}{path}", timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())

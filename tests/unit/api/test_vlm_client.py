"""The VLM client (the official openai package) against a local fake OpenAI-compatible server.

The server records each request as received, so the tests assert the exact wire format (content parts, data URLs,
response_format, extra_body), and it replays the response shapes of vLLM, FastDeploy and a hosted provider,
fenced JSON, prose around JSON, 429 with Retry-After, timeouts, 500s and garbage.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from dreambooth_api.evaluation import VLM_API_KEY_ENV, StructuredOutput, VlmSpec
from dreambooth_api.vlm.client import REPAIR_INSTRUCTION, VlmClient, image_data_url
from dreambooth_api.vlm.tasks import VlmTask
from tests.infra.fake_vlm import (
    FakeVlm,
    Reply,
    error_reply,
    fastdeploy_reply,
    garbage_reply,
    hosted_reply,
    image_urls,
    vllm_reply,
)
from tests.infra.processes import free_port

GOOD = '{"reason": "the same corgi", "score": 3}'


class Score(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})

    reason: str
    score: int = Field(ge=0, le=4)


SCHEMA = {
    "additionalProperties": False,
    "properties": {
        "reason": {"title": "Reason", "type": "string"},
        "score": {"maximum": 4, "minimum": 0, "title": "Score", "type": "integer"},
    },
    "required": ["reason", "score"],
    "type": "object",
}


@pytest.fixture(scope="module")
def module_server() -> Iterator[FakeVlm]:
    with FakeVlm() as server:
        yield server


@pytest.fixture
def server(module_server: FakeVlm) -> FakeVlm:
    module_server.reset()
    return module_server


def spec(server: FakeVlm | None = None, **fields: Any) -> VlmSpec:
    base = server.base_url if server else f"http://127.0.0.1:{free_port()}/v1"
    values: dict[str, Any] = {"base_url": base, "model": "baidu/ERNIE-4.5-VL-28B-A3B-PT", "max_retries": 0}
    return VlmSpec(**{**values, **fields})


def task(*images: Image.Image) -> VlmTask[Score]:
    return VlmTask("concept_preservation", ("Rate the sample.", *images), Score)


def png(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def test_exact_request_with_json_schema(server: FakeVlm) -> None:
    server.script(vllm_reply(GOOD))
    extra = {"chat_template_kwargs": {"enable_thinking": False}, "top_k": 1}
    with VlmClient(spec(server, extra_body=extra, max_image_side=64), api_key="sk-test") as client:
        answer = client.ask(task(Image.new("RGB", (200, 100), (255, 0, 0)), Image.new("L", (10, 20), 7)))
    assert answer.value == Score(reason="the same corgi", score=3)

    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = request.body
    assert set(body) == {"model", "messages", "response_format", "temperature", "chat_template_kwargs", "top_k"}
    assert body["model"] == "baidu/ERNIE-4.5-VL-28B-A3B-PT"
    assert body["temperature"] == 0.0
    assert body["chat_template_kwargs"] == {"enable_thinking": False}  # extra_body is merged into the body
    assert body["top_k"] == 1
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "concept_preservation", "schema": SCHEMA, "strict": True},
    }
    [message] = body["messages"]
    assert message["role"] == "user"
    types = [p["type"] for p in message["content"]]
    assert types == ["text", "image_url", "image_url", "text"]
    assert message["content"][0] == {"type": "text", "text": "Rate the sample."}
    assert message["content"][3]["text"].startswith("Answer with only one JSON object")
    assert json.loads(message["content"][3]["text"].split("\n", 1)[1]) == SCHEMA  # the schema is in the prompt too
    first, second = (png(u) for u in image_urls(body))
    assert (first.size, first.mode, first.getpixel((5, 5))) == ((64, 32), "RGB", (255, 0, 0))  # downscaled
    assert (second.size, second.mode) == ((10, 20), "RGB")  # small images keep their size


def test_api_key_from_the_environment(server: FakeVlm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VLM_API_KEY_ENV, "sk-from-secret\n")
    server.script(vllm_reply(GOOD))
    with VlmClient(spec(server)) as client:
        assert client.ask(task()).ok
    assert server.requests[0].headers["authorization"] == "Bearer sk-from-secret"


def test_prompt_mode_sends_no_response_format(server: FakeVlm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VLM_API_KEY_ENV, raising=False)
    server.script(fastdeploy_reply(GOOD))
    with VlmClient(spec(server, structured_output=StructuredOutput.PROMPT, temperature=None, max_tokens=512)) as c:
        assert c.ask(task()).ok
    body = server.requests[0].body
    assert "response_format" not in body
    assert "temperature" not in body
    assert body["max_tokens"] == 512
    assert server.requests[0].headers["authorization"] == "Bearer EMPTY"  # vLLM's convention without a key


def test_auto_falls_back_to_the_prompt_when_response_format_is_refused(server: FakeVlm) -> None:
    server.script(error_reply(400, "response_format json_schema is not supported"), hosted_reply(GOOD),
                  hosted_reply(GOOD))  # fmt: skip
    with VlmClient(spec(server)) as client:
        assert client.ask(task()).ok
        assert client.ask(task()).ok
    assert ["response_format" in b for b in server.bodies()] == [True, False, False]


def test_json_schema_mode_does_not_fall_back(server: FakeVlm) -> None:
    server.script(error_reply(400, "bad response_format"))
    with VlmClient(spec(server, structured_output=StructuredOutput.JSON_SCHEMA)) as client:
        answer = client.ask(task())
    assert answer.value is None
    assert answer.reason == "the VLM endpoint answered HTTP 400: Error code: 400 - bad response_format"
    assert len(server.requests) == 1


DECOY = '{"reason": "reasoning, not the answer", "score": 0}'


@pytest.mark.parametrize(
    "reply",
    [
        vllm_reply(GOOD, reasoning=DECOY),
        fastdeploy_reply(GOOD, reasoning=DECOY),
        fastdeploy_reply(GOOD, reasoning=None),
        hosted_reply(GOOD, reasoning=DECOY),
        vllm_reply(f"```json\n{GOOD}\n```", reasoning=None),
        hosted_reply(f"Sure. Here is my rating:\n{GOOD}\nLet me know if you need more."),
        fastdeploy_reply(f"<think>first {DECOY}</think>\n\n{GOOD}"),  # no reasoning parser on the server
    ],
    ids=["vllm", "fastdeploy", "fastdeploy-no-reasoning", "hosted", "fenced", "prose", "think-in-content"],
)
def test_reads_only_message_content(server: FakeVlm, reply: Reply) -> None:
    server.script(reply)
    with VlmClient(spec(server)) as client:
        answer = client.ask(task())
    assert answer.value == Score(reason="the same corgi", score=3)
    assert len(server.requests) == 1


def test_one_repair_request_with_the_error(server: FakeVlm) -> None:
    server.script(vllm_reply("I would give it a 3 out of 4."), vllm_reply(GOOD))
    with VlmClient(spec(server)) as client:
        answer = client.ask(task(Image.new("RGB", (8, 8))))
    assert answer.ok
    first, repair = server.bodies()
    assert repair["messages"][:1] == first["messages"]
    assert repair["messages"][1] == {"role": "assistant", "content": "I would give it a 3 out of 4."}
    error = "the answer contains no JSON object"
    assert repair["messages"][2] == {
        "role": "user",
        "content": [{"type": "text", "text": REPAIR_INSTRUCTION.format(error=error)}],
    }
    assert repair["response_format"] == first["response_format"]


def test_an_unusable_answer_after_the_repair_is_unknown(server: FakeVlm) -> None:
    server.script(hosted_reply('{"reason": "x", "score": 9}'), hosted_reply(None, reasoning="ran out of tokens"))
    with VlmClient(spec(server)) as client:
        answer = client.ask(task())
    assert answer.value is None
    assert answer.reason == "the VLM's answer was unusable after a repair request: the answer is empty"
    assert len(server.requests) == 2
    assert "score: Input should be less than or equal to 4" in server.bodies()[1]["messages"][2]["content"][0]["text"]


def test_retry_after_is_honoured(server: FakeVlm) -> None:
    server.script(error_reply(429, "slow down", headers={"Retry-After": "1"}), vllm_reply(GOOD))
    with VlmClient(spec(server, max_retries=2)) as client:
        assert client.ask(task()).ok
    limited, retried = server.requests
    assert retried.at - limited.at >= 0.95  # the client's own backoff would wait 0.5 s at most
    assert retried.headers["x-stainless-retry-count"] == "1"


def test_without_retry_after_the_backoff_is_shorter(server: FakeVlm) -> None:
    server.script(error_reply(429, "slow down"), vllm_reply(GOOD))
    with VlmClient(spec(server, max_retries=2)) as client:
        assert client.ask(task()).ok
    limited, retried = server.requests
    assert retried.at - limited.at < 0.9


def test_5xx_are_retried_then_unknown(server: FakeVlm) -> None:
    server.script(error_reply(503), fastdeploy_reply(GOOD))
    with VlmClient(spec(server, max_retries=1)) as client:
        assert client.ask(task()).ok
        assert len(server.requests) == 2
        server.script(error_reply(500), error_reply(502, "bad gateway"))
        answer = client.ask(task())
        assert answer.reason == "the VLM endpoint answered HTTP 502: Error code: 502 - bad gateway"
        assert len(server.requests) == 4  # the first try and one retry
        server.script(vllm_reply(GOOD))
        assert client.ask(task()).ok  # a 5xx does not give up on the endpoint


def test_timeout_is_unknown_and_gives_up_on_the_endpoint(server: FakeVlm) -> None:
    server.script(Reply(delay=1.0, body={}))
    with VlmClient(spec(server, timeout_seconds=0.2)) as client:
        started = time.monotonic()
        answer = client.ask(task())
        assert time.monotonic() - started < 0.9
        assert answer.reason == "the VLM endpoint timed out (after retries)"
        assert client.ask(task()).reason == answer.reason  # no second request to a dead endpoint
    assert len(server.requests) == 1


def test_unreachable_endpoint_is_unknown() -> None:
    with VlmClient(spec(None, max_retries=1)) as client:
        answers = client.ask_many([task(), task(), task()])
    assert all(a.value is None for a in answers)
    assert answers[0].reason is not None
    assert answers[0].reason.startswith("the VLM endpoint is unreachable (after retries)")
    assert client.broken == answers[0].reason


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (garbage_reply(), "the VLM endpoint's response is not a chat completion"),
        (Reply(body={"unexpected": "document"}), "the VLM endpoint's response is not a chat completion"),
        (error_reply(401, "invalid api key"), "the VLM endpoint answered HTTP 401: Error code: 401 - invalid api key"),
    ],
    ids=["html", "not-a-completion", "unauthorised"],
)
def test_garbage_and_refusals_are_unknown(server: FakeVlm, reply: Reply, reason: str) -> None:
    server.script(reply)
    with VlmClient(spec(server)) as client:
        answer = client.ask(task())
    assert answer.value is None
    assert answer.reason is not None
    assert answer.reason.startswith(reason)


def test_max_concurrency_bounds_requests_in_flight(server: FakeVlm) -> None:
    server.reset(responder=lambda _body: Reply(body=vllm_reply(GOOD).body, delay=0.15))
    with VlmClient(spec(server, max_concurrency=2)) as client:
        answers = client.ask_many([task() for _ in range(6)])
    assert all(a.ok for a in answers)
    assert server.max_in_flight == 2


def test_image_data_url_keeps_the_aspect_ratio() -> None:
    url = image_data_url(Image.new("RGBA", (1000, 250), (1, 2, 3, 4)), 768)
    image = png(url)
    assert (image.size, image.mode) == ((768, 192), "RGB")


def test_vlm_captions_and_judge_do_not_import_torch() -> None:
    """They can run where torch is not installed (the user's machine for `dreambooth submit --caption`), and the
    caption rules (which the trainer's data module imports) do not import the openai client."""
    code = (
        "import sys\n"
        "import dreambooth_api.vlm.captions\n"
        "print('openai' in sys.modules)\n"
        "import dreambooth_api.vlm.client, dreambooth_trainer.evaluation.judge\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["False", "[]"]

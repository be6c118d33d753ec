"""A fake OpenAI-compatible chat-completions server for the vision-language-model client's tests.

The real endpoints (ERNIE 4.5 VL on vLLM or FastDeploy, hosted providers) are paid external services, so the tests
run the official `openai` client against this server on 127.0.0.1. It records every request exactly as received
(path, headers, JSON body, arrival time) and answers from a script of `Reply`s, then from a `responder` function
of the request body. The reply builders copy the response shapes of the servers the client must read:

- `vllm_reply`: vLLM with a reasoning parser (`message.reasoning_content`, `stop_reason`, `prompt_logprobs`);
- `fastdeploy_reply`: FastDeploy (`reasoning_content`, `multimodal_content`, token-id fields set to null);
- `hosted_reply`: a hosted router such as OpenRouter (`provider`, `message.reasoning`, `refusal`,
  `native_finish_reason`);
- `error_reply`: OpenAI's error envelope with any status and headers (429 with Retry-After, 500s);
- `garbage_reply`: a 200 whose body is not JSON at all;
- a `Reply` with `delay` longer than the client's timeout plays a timeout.

`GET /v1/models` (the pre-flight probe) lists `models` in vLLM's shape, or answers the next of `script_models`;
those requests go to `model_requests`, apart from the chat requests.

    with FakeVlm() as server:
        server.script(error_reply(429, headers={"Retry-After": "1"}), vllm_reply('{"score": 3}'))
        ...  # point VlmSpec.base_url at server.base_url
        server.requests[0].body["messages"]
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.infra.processes import free_port, wait_until


@dataclass
class Reply:
    """One scripted response."""

    status: int = 200
    body: Any = None
    """A JSON-able body, or a `str` sent as it is (text/plain) when `raw`."""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before answering (longer than the client's timeout plays a timeout)."""
    raw: bool = False


@dataclass
class Recorded:
    """One request as the server received it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float
    """time.monotonic() at arrival."""


SERVED_MODELS = ("m", "baidu/ERNIE-4.5-VL-28B-A3B-PT")
"""What `GET /v1/models` lists by default: the model names the tests configure."""


def _usage() -> dict[str, Any]:
    return {"prompt_tokens": 812, "completion_tokens": 41, "total_tokens": 853}


def _base(model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
    }


def vllm_reply(content: str | None, reasoning: str | None = "Let me look at the images.", model: str = "m") -> Reply:
    """vLLM's shape (`--reasoning-parser ernie45`): the reasoning in `reasoning_content`, the answer in `content`."""
    message: dict[str, Any] = {
        "role": "assistant",
        "reasoning_content": reasoning,
        "content": content,
        "tool_calls": [],
    }
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop", "stop_reason": None}
    body = {**_base(model), "choices": [choice], "usage": _usage(), "prompt_logprobs": None,
            "kv_transfer_params": None}  # fmt: skip
    return Reply(body=body)


def fastdeploy_reply(content: str | None, reasoning: str | None = None, model: str = "default") -> Reply:
    """FastDeploy's shape: extra per-message fields (multimodal content, token ids) set to null."""
    message = {
        "role": "assistant",
        "content": content,
        "multimodal_content": None,
        "reasoning_content": reasoning,
        "tool_calls": None,
        "prompt_token_ids": None,
        "completion_token_ids": None,
        "text_after_process": None,
        "raw_prediction": None,
        "prompt_tokens": None,
        "completion_tokens": None,
    }
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    usage = {**_usage(), "prompt_tokens_details": {"cached_tokens": 0}}
    return Reply(body={**_base(model), "choices": [choice], "usage": usage})


def hosted_reply(
    content: str | None, reasoning: str | None = "thinking...", model: str = "baidu/ernie-4.5-vl-424b-a47b"
) -> Reply:
    """A hosted router's shape: `provider`, the reasoning in `message.reasoning`, `refusal`."""
    message = {"role": "assistant", "content": content, "refusal": None, "reasoning": reasoning}
    choice = {
        "logprobs": None,
        "finish_reason": "stop",
        "native_finish_reason": "stop",
        "index": 0,
        "message": message,
    }
    body = {**_base(model), "id": f"gen-{uuid.uuid4().hex[:20]}", "provider": "Novita", "choices": [choice],
            "usage": _usage(), "system_fingerprint": ""}  # fmt: skip
    return Reply(body=body)


def error_reply(status: int, message: str = "error", headers: dict[str, str] | None = None) -> Reply:
    """OpenAI's error envelope (which vLLM, FastDeploy and hosted providers also use)."""
    kind = "rate_limit_exceeded" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return Reply(status=status, body=body, headers=dict(headers or {}))


def garbage_reply() -> Reply:
    """A 200 whose body is not JSON (a misconfigured proxy's HTML page)."""
    return Reply(body="<html><body>502 upstream went away</body></html>", raw=True)


def answer_text(body: dict[str, Any]) -> str:
    """All text parts of a recorded request's last user message."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def image_urls(body: dict[str, Any]) -> list[str]:
    """The data URLs of a recorded request's image parts, in order, over all messages."""
    urls = []
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, list):
            urls += [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
    return urls


class FakeVlm:
    """The fake server: started on a free loopback port in a thread; `base_url` ends in /v1."""

    def __init__(self, responder: Callable[[dict[str, Any]], Reply] | None = None) -> None:
        self.requests: list[Recorded] = []
        self.model_requests: list[Recorded] = []
        self.models: list[str] = list(SERVED_MODELS)
        self.responder = responder
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: deque[Reply] = deque()
        self._models_script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.app = self._build_app()
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-vlm", daemon=True)

    def script(self, *replies: Reply) -> None:
        """Queue replies; each request takes the next one (then `responder`, then a 500)."""
        with self._lock:
            self._script.extend(replies)

    def script_models(self, *replies: Reply) -> None:
        """Queue replies to `GET /v1/models`; each request takes the next one (then the model list)."""
        with self._lock:
            self._models_script.extend(replies)

    def reset(self, responder: Callable[[dict[str, Any]], Reply] | None = None) -> None:
        """Forget the requests, the script and the concurrency high-water mark; set a new responder. Waits for the
        requests still in flight (a played timeout) to finish first."""
        wait_until(lambda: self.in_flight == 0, what="the fake VLM's requests in flight", timeout=10, interval=0.02)
        with self._lock:
            self.requests.clear()
            self.model_requests.clear()
            self.models = list(SERVED_MODELS)
            self._script.clear()
            self._models_script.clear()
            self.max_in_flight = 0
            self.responder = responder

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.body for r in self.requests]

    def _next(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            if self._script:
                return self._script.popleft()
        if self.responder is not None:
            return self.responder(body)
        return error_reply(500, "the fake VLM has no reply scripted")

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            with self._lock:
                self.requests.append(Recorded(request.url.path, dict(request.headers), body, time.monotonic()))
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                reply = self._next(body)
                if reply.delay:
                    await asyncio.sleep(reply.delay)
            finally:
                with self._lock:
                    self.in_flight -= 1
            if reply.raw:
                return Response(str(reply.body), status_code=reply.status, headers=reply.headers,
                                media_type="text/plain")  # fmt: skip
            return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            with self._lock:
                self.model_requests.append(Recorded(request.url.path, dict(request.headers), {}, time.monotonic()))
                reply = self._models_script.popleft() if self._models_script else None
                served = list(self.models)
            if reply is None:
                data: list[dict[str, Any]] = [
                    {"id": m, "object": "model", "created": 0, "owned_by": "vllm", "root": m, "parent": None,
                     "max_model_len": 32768, "permission": []}
                    for m in served
                ]  # fmt: skip
                return JSONResponse({"object": "list", "data": data})
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.raw:
                return Response(str(reply.body), status_code=reply.status, media_type="text/plain")
            return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)

        return app

    def start(self) -> FakeVlm:
        self._thread.start()
        wait_until(lambda: self._server.started, what="the fake VLM server", timeout=20, interval=0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeVlm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve() -> Iterator[FakeVlm]:
    """A started server for a pytest fixture (`yield from serve()`)."""
    with FakeVlm() as server:
        yield server


def task_responder(answers: dict[str, str]) -> Callable[[dict[str, Any]], Reply]:
    """Answer each request by its task (the `response_format` schema's name: caption, concept_preservation,
    prompt_following) with `answers[task]`, in vLLM's shape; a 500 for a task without an answer."""

    def reply(body: dict[str, Any]) -> Reply:
        name = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
        if name not in answers:
            return error_reply(500, f"no answer for task {name}")
        return vllm_reply(answers[name])

    return reply

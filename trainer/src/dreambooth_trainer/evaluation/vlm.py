"""A client for a vision-language model behind an OpenAI-compatible chat-completions endpoint.

It is the official `openai` package (no hand-written HTTP), configured from `VlmSpec`:

- one request per task: a single user message whose content parts are text and images, each image downscaled to
  `maxImageSide` and sent as a `data:image/png;base64,...` URL; the answer's JSON schema is always written into the
  text, and also sent as `response_format: {"type": "json_schema", ...}` unless `structuredOutput` is `prompt`
  (with `auto`, an endpoint that refuses it with HTTP 400/422 is asked without it from then on);
- `extraBody` goes into every request through the client's `extra_body`;
- only `message.content` is read (`reasoning_content`, `reasoning` are never looked at); its first JSON object is
  validated against the task's answer model (`answers.parse_answer`); a bad answer gets one repair request that
  sends back the answer and the validation error;
- timeouts, connection errors, 408, 409, 429 and 5xx are retried by the openai client itself (`max_retries`, with
  exponential backoff, honouring `Retry-After`);
- nothing raises: after the retries, a failure is a `VlmAnswer` with no value and a reason. An unreachable endpoint
  or a refused credential fails the remaining tasks at once with the same reason;
- `maxConcurrency` bounds the requests in flight (a semaphore; `ask_many` runs tasks on a thread pool).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import openai
from PIL import Image
from pydantic import BaseModel

from dreambooth_api.evaluation import VLM_API_KEY_ENV, StructuredOutput, VlmSpec
from dreambooth_trainer.evaluation.answers import AnswerFormatError, answer_schema, parse_answer

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

# The key sent when none is configured: vLLM and FastDeploy without --api-key accept any.
NO_API_KEY = "EMPTY"
SCHEMA_INSTRUCTION = "Answer with only one JSON object, no other text, that follows this JSON schema:\n{schema}"
REPAIR_INSTRUCTION = (
    "Your answer could not be used: {error}. Answer again with only one JSON object that follows the schema."
)
# Errors after which the endpoint will not answer the next task either.
_FATAL = (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)
# Errors with which an endpoint refuses `response_format` (with structuredOutput: auto, ask without it).
_REFUSED = (openai.BadRequestError, openai.UnprocessableEntityError)

Part = str | Image.Image


@dataclass(frozen=True)
class VlmTask(Generic[T]):
    """One question: the content parts in order (text and images) and the answer's model."""

    name: str
    """The schema's name in `response_format` (letters, digits, _ and -)."""
    parts: tuple[Part, ...]
    answer: type[T]


@dataclass(frozen=True)
class VlmAnswer(Generic[T]):
    """A validated answer, or None with the reason it is unknown."""

    value: T | None
    reason: str | None = None
    content: str | None = None
    """The last answer's `message.content` as received (for the logs)."""

    @property
    def ok(self) -> bool:
        return self.value is not None


def image_data_url(image: Image.Image, max_side: int) -> str:
    """A PNG data URL of `image` in RGB, downscaled (aspect kept) so that its longer side is at most `max_side`."""
    img = image.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def content_parts(parts: Sequence[Part], max_side: int) -> list[dict[str, Any]]:
    """The chat-completions content parts: `{"type": "text", ...}` and `{"type": "image_url", ...}` in order."""
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, str):
            out.append({"type": "text", "text": part})
        else:
            out.append({"type": "image_url", "image_url": {"url": image_data_url(part, max_side)}})
    return out


def build_messages(task: VlmTask[Any], max_side: int) -> list[dict[str, Any]]:
    """The request's messages: one user message with the task's parts and the schema instruction last."""
    schema = json.dumps(answer_schema(task.answer), separators=(",", ":"))
    parts = [*task.parts, SCHEMA_INSTRUCTION.format(schema=schema)]
    return [{"role": "user", "content": content_parts(parts, max_side)}]


def response_format(task: VlmTask[Any]) -> dict[str, Any]:
    """`response_format` asking for the task's schema (OpenAI's json_schema form, which vLLM and FastDeploy accept)."""
    return {
        "type": "json_schema",
        "json_schema": {"name": task.name, "schema": answer_schema(task.answer), "strict": True},
    }


class BadResponseError(Exception):
    """A response that is not a chat completion (no choices: an HTML page, an unrelated JSON document)."""


def _error_reason(err: Exception) -> str:
    if isinstance(err, BadResponseError):
        return str(err)
    if isinstance(err, openai.APITimeoutError):
        return "the VLM endpoint timed out (after retries)"
    if isinstance(err, openai.APIConnectionError):
        return f"the VLM endpoint is unreachable (after retries): {err}"
    if isinstance(err, openai.APIStatusError):
        return f"the VLM endpoint answered HTTP {err.status_code}: {_short(str(err.message))}"
    return f"the VLM request failed: {type(err).__name__}: {_short(str(err))}"


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class VlmClient:
    """Asks a VLM questions with JSON answers; thread-safe; never raises from `ask` or `ask_many`."""

    def __init__(
        self,
        spec: VlmSpec,
        api_key: str | None = None,
        *,
        client: openai.OpenAI | None = None,
    ) -> None:
        """`api_key` defaults to the `DREAMBOOTH_VLM_API_KEY` variable (no key: "EMPTY", as vLLM expects)."""
        self.spec = spec
        # A Secret's value often ends in a newline, which is no valid header character.
        key = (api_key or os.environ.get(VLM_API_KEY_ENV) or "").strip() or NO_API_KEY
        self._client = client or openai.OpenAI(
            base_url=spec.base_url,
            api_key=key,
            timeout=spec.timeout_seconds,
            max_retries=spec.max_retries,
        )
        self._slots = threading.BoundedSemaphore(spec.max_concurrency)
        self._lock = threading.Lock()
        self._schema_format = spec.structured_output is not StructuredOutput.PROMPT
        self._broken: str | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> VlmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def broken(self) -> str | None:
        """Why the endpoint is given up on (unreachable, credentials refused), or None."""
        return self._broken

    def ask_many(self, tasks: Sequence[VlmTask[T]]) -> list[VlmAnswer[T]]:
        """Answers to `tasks`, in order, with at most `maxConcurrency` requests in flight."""
        if not tasks:
            return []
        workers = min(self.spec.max_concurrency, len(tasks))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm") as pool:
            return list(pool.map(self.ask, tasks))

    def ask(self, task: VlmTask[T]) -> VlmAnswer[T]:
        """The validated answer to `task`, or an unknown one with the reason."""
        try:
            with self._slots:
                return self._ask(task)
        except Exception as err:  # the evaluation must go on whatever the client or server does
            log.exception("VLM task %s failed unexpectedly", task.name)
            return VlmAnswer(None, f"the VLM request failed: {type(err).__name__}: {_short(str(err))}")

    def _ask(self, task: VlmTask[T]) -> VlmAnswer[T]:
        if self._broken:
            return VlmAnswer(None, self._broken)
        messages = build_messages(task, self.spec.max_image_side)
        content: str | None = None
        for attempt in range(2):  # the first answer, and one repair
            try:
                content = self._complete(task, messages)
            except Exception as err:
                reason = _error_reason(err)
                if isinstance(err, _FATAL):
                    with self._lock:
                        self._broken = self._broken or reason
                log.warning("VLM task %s: %s", task.name, reason)
                return VlmAnswer(None, reason, content)
            try:
                return VlmAnswer(parse_answer(content, task.answer), None, content)
            except AnswerFormatError as err:
                error = str(err)
                log.info("VLM task %s: unusable answer (attempt %d): %s", task.name, attempt + 1, error)
            messages = [
                *messages,
                {"role": "assistant", "content": content or ""},
                {"role": "user", "content": [{"type": "text", "text": REPAIR_INSTRUCTION.format(error=error)}]},
            ]
        return VlmAnswer(None, f"the VLM's answer was unusable after a repair request: {error}", content)

    def _complete(self, task: VlmTask[Any], messages: list[dict[str, Any]]) -> str | None:
        """One chat completion (the openai client retries it); returns `message.content`."""
        use_format = self._schema_format
        try:
            return self._create(messages, response_format(task) if use_format else None)
        except _REFUSED as err:
            if not (use_format and self.spec.structured_output is StructuredOutput.AUTO):
                raise
            with self._lock:
                if self._schema_format:
                    log.warning("the VLM endpoint refused response_format (%s); the schema goes in the prompt", err)
                self._schema_format = False
            return self._create(messages, None)

    def _create(self, messages: list[dict[str, Any]], fmt: dict[str, Any] | None) -> str | None:
        kwargs: dict[str, Any] = {"model": self.spec.model, "messages": messages}
        if fmt is not None:
            kwargs["response_format"] = fmt
        if self.spec.temperature is not None:
            kwargs["temperature"] = self.spec.temperature
        if self.spec.max_tokens is not None:
            kwargs["max_tokens"] = self.spec.max_tokens
        if self.spec.extra_body:
            kwargs["extra_body"] = self.spec.extra_body
        completion = self._client.chat.completions.create(**kwargs)
        choices = getattr(completion, "choices", None)
        if not choices:
            raise BadResponseError(f"the VLM endpoint's response is not a chat completion: {_short(repr(completion))}")
        content = choices[0].message.content
        return content if isinstance(content, str) else None

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

`probe_endpoint` is the pre-flight check of an endpoint (`models.list`, one try, a short timeout): it answers and
serves the configured model, or the problem and whether it is permanent (a refused key, an unknown model) or may
pass (a timeout, a 5xx).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
from PIL import Image
from pydantic import BaseModel

from dreambooth_api.evaluation import VLM_API_KEY_ENV, StructuredOutput, VlmSpec
from dreambooth_api.vlm.answers import AnswerFormatError, answer_schema, parse_answer
from dreambooth_api.vlm.tasks import Part, VlmAnswer, VlmTask

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

# The key sent when none is configured: vLLM and FastDeploy without --api-key accept any.
NO_API_KEY = "EMPTY"
PROBE_TIMEOUT_SECONDS = 10.0
"""The pre-flight `models.list` request's timeout (at most the spec's `timeoutSeconds`)."""
SCHEMA_INSTRUCTION = "Answer with only one JSON object, no other text, that follows this JSON schema:\n{schema}"
REPAIR_INSTRUCTION = (
    "Your answer could not be used: {error}. Answer again with only one JSON object that follows the schema."
)
# Errors after which the endpoint will not answer the next task either.
_FATAL = (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)
# Errors with which an endpoint refuses `response_format` (with structuredOutput: auto, ask without it).
_REFUSED = (openai.BadRequestError, openai.UnprocessableEntityError)


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


def resolve_api_key(explicit: str | None = None) -> str:
    """The bearer token: `explicit`, else `DREAMBOOTH_VLM_API_KEY`, else "EMPTY" (what vLLM expects without a key).
    A Secret's value often ends in a newline, which is no valid header character, so it is stripped."""
    return (explicit or os.environ.get(VLM_API_KEY_ENV) or "").strip() or NO_API_KEY


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
        self._client = client or openai.OpenAI(
            base_url=spec.base_url,
            api_key=resolve_api_key(api_key),
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


@dataclass(frozen=True)
class EndpointProblem:
    """Why an endpoint failed the pre-flight probe."""

    message: str
    permanent: bool
    """True when retrying cannot help (the key is refused, the model is not served, baseUrl has no /models)."""
    auth: bool = False
    """The endpoint refused the API key (HTTP 401 or 403)."""


def _status_message(err: openai.APIStatusError) -> str:
    """The error envelope's message ("Invalid API key"), without the client's "Error code: 401 - " prefix."""
    body = err.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return _short(body["message"])
    return _short(re.sub(r"^Error code: \d+ - ", "", str(err.message)))


def _probe_problem(spec: VlmSpec, err: Exception) -> EndpointProblem:
    where = f"the VLM endpoint {spec.base_url}"
    if isinstance(err, openai.AuthenticationError | openai.PermissionDeniedError):
        return EndpointProblem(
            f"{where} refused the API key (HTTP {err.status_code}): {_status_message(err)}", True, auth=True
        )
    if isinstance(err, openai.NotFoundError):
        return EndpointProblem(
            f"{where} has no /models (HTTP 404): is vlm.baseUrl the API's base URL, ending in /v1?", True
        )
    if isinstance(err, openai.APITimeoutError):
        return EndpointProblem(f"{where} did not answer within the probe's timeout", False)
    if isinstance(err, openai.APIConnectionError):
        return EndpointProblem(f"{where} is unreachable: {_short(str(err.__cause__ or err))}", False)
    if isinstance(err, openai.APIStatusError):
        return EndpointProblem(f"{where} answered HTTP {err.status_code}: {_status_message(err)}", False)
    return EndpointProblem(f"{where} did not answer with a model list: {type(err).__name__}: {_short(str(err))}", False)


def probe_endpoint(
    spec: VlmSpec, api_key: str | None = None, *, timeout: float = PROBE_TIMEOUT_SECONDS
) -> EndpointProblem | None:
    """`GET /models` through the openai client (one try, at most `timeout` seconds): None when the endpoint answers
    and lists `spec.model`, else the problem. An unknown model is permanent; so are a refused key and a missing
    /models; a timeout, a connection error, a 429 or a 5xx may pass."""
    client = openai.OpenAI(
        base_url=spec.base_url,
        api_key=resolve_api_key(api_key),
        timeout=min(timeout, spec.timeout_seconds),
        max_retries=0,
    )
    try:
        page = client.models.list()
        served = [m.id for m in page.data if isinstance(getattr(m, "id", None), str)]
    except Exception as err:  # every outcome is a problem to report, never a crash of the check
        return _probe_problem(spec, err)
    finally:
        client.close()
    if spec.model not in served:
        listed = ", ".join(served[:10]) + (", ..." if len(served) > 10 else "")
        return EndpointProblem(
            f"the VLM endpoint {spec.base_url} does not serve vlm.model {spec.model!r} (it serves: {listed or 'none'})",
            True,
        )
    return None

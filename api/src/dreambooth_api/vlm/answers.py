"""Finding and validating the JSON object in a vision-language model's answer.

Served models wrap JSON in many ways even when asked not to: a ```json fence, a sentence before or after it, a
`<think>...</think>` block when the server has no reasoning parser (with one, the reasoning goes to a separate
`reasoning_content` or `reasoning` field, which the client never reads). The rule is the same for every provider:
the answer is the FIRST JSON object in the text that ends after the reasoning (the first `</think>`), validated
against the expected pydantic model. Anything else raises `AnswerFormatError` (and nothing else is raised), whose
message is what the repair request sends back.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)

# Answers longer than this are cut before parsing (ours are a few hundred characters; this bounds the work).
MAX_ANSWER_CHARS = 200_000
# At most this many "{" positions are tried as the start of the object.
MAX_CANDIDATES = 2_000
_THINK_END = re.compile(r"</think>", re.IGNORECASE)
_DECODER = json.JSONDecoder()


class AnswerFormatError(ValueError):
    """The answer holds no JSON object, or its first JSON object does not match the schema."""


def _starts_thinking(text: str) -> bool:
    return text.lstrip()[:7].lower() == "<think>"


def extract_json_object(text: str | None) -> dict[str, Any]:
    """The first JSON object (a mapping) in `text` that ends after the reasoning; raises AnswerFormatError when
    there is none.

    The reasoning ends at the first `</think>`; an object that spans the tag holds it in a string and counts. An
    answer that opens `<think>` and never closes it has no answer yet (the model ran out of tokens).
    """
    if not text or not text.strip():
        raise AnswerFormatError("the answer is empty")
    text = text[:MAX_ANSWER_CHARS]
    think = _THINK_END.search(text)
    if think is None and _starts_thinking(text):
        raise AnswerFormatError("the answer is unfinished reasoning (<think> is never closed)")
    reasoning_end = think.start() if think else -1
    start = text.find("{")
    tried = 0
    while start != -1 and tried < MAX_CANDIDATES:
        tried += 1
        try:
            value, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            value, end = None, start
        if isinstance(value, dict) and end > reasoning_end:
            return value
        start = text.find("{", start + 1)
    raise AnswerFormatError("the answer contains no JSON object")


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "<object>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def parse_answer(text: str | None, model: type[T]) -> T:
    """The first JSON object of `text`, validated as `model`; raises AnswerFormatError (never anything else)."""
    obj = extract_json_object(text)
    try:
        return model.model_validate(obj)
    except ValidationError as err:
        raise AnswerFormatError(f"the JSON object does not match the schema: {_describe(err)}") from err


def answer_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of an answer model, as sent in `response_format` and in the prompt."""
    schema = model.model_json_schema()
    schema.pop("title", None)
    schema.pop("description", None)
    return schema

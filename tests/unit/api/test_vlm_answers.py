"""Finding and validating the first JSON object in a VLM's answer; Hypothesis fuzzes the parser."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

from dreambooth_api.vlm.answers import (
    AnswerFormatError,
    answer_schema,
    extract_json_object,
    parse_answer,
)


class Score(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})

    reason: str
    score: int = Field(ge=0, le=4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"reason": "same dog", "score": 4}', {"reason": "same dog", "score": 4}),
        ('```json\n{"reason": "r", "score": 3}\n```', {"reason": "r", "score": 3}),
        ('```\n{"reason": "r", "score": 3}\n```\nHope this helps!', {"reason": "r", "score": 3}),
        ('Here is my rating: {"reason": "r", "score": 2}. Thanks.', {"reason": "r", "score": 2}),
        ('<think>maybe {"score": 0}</think>\n{"reason": "r", "score": 1}', {"reason": "r", "score": 1}),
        ('lost the opening tag {"score": 0}</think>{"reason": "r", "score": 1}', {"reason": "r", "score": 1}),
        ('{"a": {"b": [1, {"c": 2}]}} {"second": true}', {"a": {"b": [1, {"c": 2}]}}),  # the first, whole
        ('[1, 2] {broken {"reason": "r", "score": 0}', {"reason": "r", "score": 0}),  # non-objects skipped
        ('{"reason": "uses } and { inside", "score": 2}', {"reason": "uses } and { inside", "score": 2}),
        ('{"reason": "a </think> tag in a string", "score": 2}', {"reason": "a </think> tag in a string", "score": 2}),
        ('  <THINK>x</THINK> {"score": 1}', {"score": 1}),
    ],
)
def test_extracts_the_first_object(text: str, expected: dict[str, Any]) -> None:
    assert extract_json_object(text) == expected


@pytest.mark.parametrize(
    "text", [None, "", "   ", "no json here", "[1, 2, 3]", "{'single': 'quotes'}", "{", "<think>{}"]
)
def test_no_object_is_a_format_error(text: str | None) -> None:
    with pytest.raises(AnswerFormatError):
        extract_json_object(text)


def test_validation_errors_name_the_field() -> None:
    assert parse_answer('{"reason": "ok", "score": "3", "extra": 1}', Score) == Score(reason="ok", score=3)
    with pytest.raises(AnswerFormatError, match=r"score: Input should be less than or equal to 4"):
        parse_answer('{"reason": "great", "score": 7}', Score)
    with pytest.raises(AnswerFormatError, match=r"reason: Field required"):
        parse_answer('{"score": 1}', Score)
    # The first object decides, even when a later one would validate.
    with pytest.raises(AnswerFormatError, match="does not match the schema"):
        parse_answer('{"score": 9} {"reason": "r", "score": 1}', Score)


def test_answer_schema_is_strict() -> None:
    schema = answer_schema(Score)
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["reason", "score"]
    assert schema["properties"]["score"] == {"maximum": 4, "minimum": 0, "title": "Score", "type": "integer"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
# Text a model might wrap around JSON: anything, with braces, quotes, fences and think tags over-represented.
noisy_text = st.lists(
    st.text(max_size=30) | st.sampled_from(["{", "}", '"', "```json", "```", "<think>", "</think>", ":", ",", "\n"]),
    max_size=30,
).map("".join)


@settings(max_examples=400, deadline=None, database=None)
@given(noisy_text)
def test_fuzz_parser_raises_only_its_error(text: str) -> None:
    try:
        result = parse_answer(text, Score)
    except AnswerFormatError:
        return
    assert isinstance(result, Score)
    assert 0 <= result.score <= 4


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.text(max_size=60).filter(lambda t: "{" not in t and "<" not in t),
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    st.text(max_size=60).filter(lambda t: "</think>" not in t),  # an object before </think> is reasoning
)
def test_fuzz_object_after_brace_free_prose_is_found(before: str, obj: dict[str, Any], after: str) -> None:
    text = f"{before}```json\n{json.dumps(obj)}\n```{after}"
    assert extract_json_object(text) == obj


@settings(max_examples=200, deadline=None, database=None)
@given(json_values)
def test_fuzz_any_json_document(value: Any) -> None:
    text = json.dumps(value)
    try:
        found = extract_json_object(text)
    except AnswerFormatError:
        assert not isinstance(value, dict)
        return
    if isinstance(value, dict):
        assert found == value


def test_deeply_nested_input_is_a_format_error_not_a_crash() -> None:
    with pytest.raises(AnswerFormatError):
        extract_json_object('{"a":' * 100_000)

"""Fuzzing `/progress` (issue 17, "Fuzzing"): what the trainer serves and what the operator and the CLI read.

- The trainer's side: whatever numbers the loop reports (NaN and infinite losses, huge or negative rates), the
  served body is strict JSON (no NaN or Infinity token, which the API server cannot parse) and reads back with the
  same step; the server answers every path it is sent, with 200 or 404, and keeps serving.
- The reader (`dreambooth_api.progress.parse_progress`): any body (random bytes, any JSON value, huge, deeply
  nested, non-finite numbers, wrong types) gives a document whose numbers are all finite, or ProgressError; never
  another exception.
"""

from __future__ import annotations

import http.client
import json
import math
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dreambooth_api.progress import MAX_PROGRESS_BYTES, ProgressDocument, ProgressError, TrainerPhase, parse_progress
from dreambooth_trainer.progress import Progress, ProgressServer

FUZZ = settings(
    max_examples=200, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**30), 10**30),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324]),
)


def _strict(body: bytes) -> Any:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-finite token {token} in {body[:200]!r}")

    return json.loads(body, parse_constant=refuse)


def _finite_numbers(doc: ProgressDocument) -> None:
    for value in (doc.loss, doc.lr, doc.steps_per_second, doc.eta_seconds):
        assert value is None or math.isfinite(value)
    for value in (doc.steps_per_second, doc.eta_seconds):
        assert value is None or value >= 0


# ----- the trainer's side -------------------------------------------------------------------------------------
@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, 10**9), NUMBERS, NUMBERS, st.integers(0, 10**6), st.floats(0, 1e6)),
        min_size=1,
        max_size=8,
    ),
    NUMBERS,
    st.sampled_from(list(TrainerPhase)),
)
def test_whatever_the_loop_reports_is_served_as_strict_json(
    steps: list[tuple[int, Any, Any, int, float]], late_loss: Any, phase: TrainerPhase
) -> None:
    progress = Progress("job", "ns", 0, 1000)
    for step, loss, lr, images, wait in steps:
        progress.on_step(step, float(loss), float(lr), images, wait)
    progress.on_loss(float(late_loss))
    progress.set_phase(phase)
    body = json.dumps(progress.state.to_wire()).encode()
    wire = _strict(body)
    assert wire["step"] == steps[-1][0]
    doc = parse_progress(body)
    assert (doc.step, doc.phase) == (steps[-1][0], phase)
    _finite_numbers(doc)
    assert progress.metrics.exposition()  # the Prometheus text renders whatever the numbers


@pytest.fixture(scope="module")
def server() -> Any:
    progress = Progress("job", "ns", 0, 10)
    progress.on_step(3, math.nan, math.inf, 1, 0.0)
    srv = ProgressServer(progress, host="127.0.0.1", port=0).start()
    yield srv
    srv.stop()


@settings(max_examples=60, deadline=timedelta(seconds=10), derandomize=True)
@given(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=300), st.sampled_from(["GET", "HEAD"]))
@example("/progress?" + "x" * 5000, "GET")
@example("/../../etc/passwd", "GET")
def test_the_server_answers_any_path_and_keeps_serving(server: Any, path: str, method: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path if path.startswith("/") else "/" + path)
        response = conn.getresponse()
        response.read()
        assert response.status in (200, 400, 404, 414, 501)
    finally:
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/progress")
        body = conn.getresponse().read()
    finally:
        conn.close()
    _strict(body)
    assert parse_progress(body).step == 3


# ----- the reader -----------------------------------------------------------------------------------------------
JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**40), 10**40),
        st.text(max_size=40),
    ),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
FIELDS = ["phase", "step", "totalSteps", "loss", "lr", "stepsPerSecond", "etaSeconds", "lastCheckpoint", "resumedFrom"]


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Objects with the document's own field names, each holding any JSON value (or a plausible one)."""
    doc: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True)):
        doc[name] = draw(
            st.one_of(
                JSON,
                st.integers(0, 10**6),
                st.fixed_dictionaries(
                    {"step": st.integers(-5, 10**6), "uri": st.text(max_size=2000)},
                    optional={"time": st.one_of(st.text(max_size=40), st.just("2026-11-27T00:00:00Z"), JSON)},
                ),
            )
        )
    return doc


def _reads_or_refuses(body: Any) -> ProgressDocument | None:
    refused: str | None = None
    try:
        doc = parse_progress(body)
    except ProgressError as err:
        refused = str(err)
    if refused is not None:
        assert refused.startswith("/progress")
        return None
    _finite_numbers(doc)
    assert doc.step >= 0
    json.dumps(doc.to_wire(), allow_nan=False)  # what the operator may put in the status is strict JSON
    return doc


@FUZZ
@given(documents())
def test_any_document_reads_with_finite_numbers_or_is_refused(doc: dict[str, Any]) -> None:
    _reads_or_refuses(doc)
    _reads_or_refuses(json.dumps(doc))  # Python writes NaN and Infinity tokens, as a careless server would


@FUZZ
@given(JSON)
def test_any_json_value_reads_or_is_refused(value: Any) -> None:
    _reads_or_refuses(json.dumps(value))


@FUZZ
@given(st.binary(max_size=2048))
@example(b'{"step": 1e999, "loss": -1e999}')
@example(b'{"step": 5, "loss": NaN, "lr": Infinity, "etaSeconds": -Infinity}')
@example(b"\xff\xfe{\x00")
@example(b"[" * 5000)
@example(b'{"step": 3, "phase": {"$gt": ""}, "lastCheckpoint": [1, 2]}')
def test_any_bytes_read_or_are_refused(body: bytes) -> None:
    _reads_or_refuses(body)


def test_a_body_over_the_limit_is_refused_unparsed() -> None:
    body = b'{"step": 1, "pad": "' + b"x" * MAX_PROGRESS_BYTES + b'"}'
    with pytest.raises(ProgressError, match="over"):
        parse_progress(body)
    deep = b"[" * (MAX_PROGRESS_BYTES - 1)
    assert _reads_or_refuses(deep) is None


def test_an_integer_of_more_than_4300_digits_is_refused() -> None:
    _reads_or_refuses(b'{"step": ' + b"9" * 5000 + b"}")

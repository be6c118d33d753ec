"""The served OpenAPI document matches the behaviour: schemathesis generates requests from it (a bounded number per
operation) and finds no 500, no undocumented status code, content type or response shape.

Not checked: that every request the schema allows is accepted (`positive_data_acceptance`): the limits that depend
on the model (its tokenizer's prompt length, the native size) and the WxH size grammar's multiples of 8 are checked
at run time and answered 400, naming the limit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from serving_support import config, running

from dreambooth_trainer.serving.server import Server

TOKEN = "schema-token"
SEEN: dict[str, set[int]] = {}
"""Status codes answered, by operation."""
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # One step and at most two small images: every generated valid request is cheap.
    cfg = config(server={"maxSteps": 1, "defaultSteps": 1, "maxResolution": 64, "maxImagesPerRequest": 2})
    with running(cfg, tmp_path_factory.mktemp("schema"), token=TOKEN) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server: Server) -> Any:
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{server.port}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_openapi_document_matches_the_behaviour(case: Any) -> None:
    response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS, timeout=60)
    SEEN.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)


def test_the_generated_requests_reached_the_model() -> None:
    """Not vacuous: schemathesis' requests were both generated (200) and refused (400)."""
    assert {200, 400} <= SEEN["POST /v1/images/generations"], SEEN

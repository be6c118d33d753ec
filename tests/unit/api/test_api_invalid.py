"""The invalid manifests that the API server rejects (tests/integration/invalid) are rejected by our models too.

The CRD's CEL rules have Python twins in the operator's models, and the trainer validates its own sections; this
keeps the two sides from drifting apart without a cluster.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from dreambooth_api.config import ConfigError, parse_job_config
from dreambooth_api.inference import InferenceServiceSpec
from dreambooth_api.job import DreamBoothJobSpec
from tests.infra.paths import TESTS

INVALID = TESTS / "integration" / "invalid"


def _cases() -> list[Any]:
    cases = []
    for path in sorted(INVALID.glob("*.yaml")):
        text = path.read_text()
        mode = re.search(r"^# mode: (\w+)$", text, re.MULTILINE)
        assert mode, path
        if mode.group(1) != "update":  # an update's documents are each valid; only the change is not
            cases.append(pytest.param(yaml.safe_load(text), id=path.stem))
    return cases


def _validate(doc: dict[str, Any]) -> None:
    if doc["kind"] == "InferenceService":
        spec = InferenceServiceSpec.model_validate(doc["spec"])
        if spec.model.base_model is not None:
            parse_job_config(
                {
                    "baseModel": spec.model.base_model,
                    "instanceImages": {"uri": "s3://b/i", "prompt": "p"},
                    "output": {"uri": "s3://b/o"},
                }
            )
        return
    job = DreamBoothJobSpec.model_validate(doc["spec"])
    if errors := job.cross_section_errors():
        raise ValueError("; ".join(errors))
    parse_job_config(job.trainer_config("x", "default"))


@pytest.mark.parametrize("doc", _cases())
def test_models_reject_what_the_api_server_rejects(doc: dict[str, Any]) -> None:
    with pytest.raises((ValidationError, ConfigError, ValueError)):
        _validate(doc)


def test_there_are_enough_invalid_manifests() -> None:
    assert len(list(INVALID.glob("*.yaml"))) >= 25

"""The examples parse with the operator's models, and their trainer sections with the trainer's own config."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from dreambooth_api.config import parse_job_config
from dreambooth_api.constants import API_VERSION, INFERENCE_KIND, JOB_KIND
from dreambooth_api.inference import InferenceServiceSpec
from dreambooth_api.job import DreamBoothJobSpec
from tests.infra.paths import ROOT

EXAMPLES = ROOT / "examples"
PLACEHOLDERS = ("s3://dreambooth-examples/", "http://s3.example:8333", "s3-credentials")


def _docs(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == kind
    ]


@pytest.mark.parametrize(("name", "doc"), _docs(JOB_KIND), ids=lambda v: v if isinstance(v, str) else "")
def test_job_example_is_a_valid_trainer_config(name: str, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == API_VERSION
    spec = DreamBoothJobSpec.model_validate(doc["spec"])
    config = parse_job_config(spec.trainer_config(doc["metadata"]["name"], "default"))
    assert config.name == doc["metadata"]["name"]
    assert config.output.uri == doc["spec"]["output"]["uri"]


@pytest.mark.parametrize(("name", "doc"), _docs(INFERENCE_KIND), ids=lambda v: v if isinstance(v, str) else "")
def test_inference_example_parses(name: str, doc: dict[str, Any]) -> None:
    spec = InferenceServiceSpec.model_validate(doc["spec"])
    assert (spec.model.from_job is None) != (spec.model.model_uri is None)


def test_required_examples_exist_and_use_the_placeholders() -> None:
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {
        "minimal-job.yaml",
        "full-job.yaml",
        "lora-job.yaml",
        "multi-node-job.yaml",
        "inference-from-job.yaml",
        "inference-multi-adapter.yaml",
    } <= names
    minimal = (EXAMPLES / "minimal-job.yaml").read_text()
    assert all(p in minimal for p in PLACEHOLDERS)
    # "about ten lines": the minimal example stays short (comments aside).
    body = [line for line in minimal.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(body) <= 22


def test_full_example_sets_every_spec_section() -> None:
    (_, doc), *_ = [d for d in _docs(JOB_KIND) if d[0] == "full-job.yaml"]
    assert set(doc["spec"]) == {a.alias for a in DreamBoothJobSpec.model_fields.values()}

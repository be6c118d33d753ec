"""build_trainer_config: DreamBoothJob -> the trainer's JobConfig wire dict."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from dreambooth_api.config import parse_job_config
from dreambooth_api.trainer_config import build_trainer_config, render_trainer_config


def _job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "dreambooth.ai/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": "cat", "namespace": "team-a", "uid": "u1", "generation": 3},
        "spec": {
            "baseModel": {"tiny": True},
            "instanceImages": {"uri": "s3://bucket/cat/", "prompt": "a photo of sks cat"},
            "output": {"uri": "s3://bucket/out/cat"},
        },
    }
    base["spec"].update(spec)
    return base


@pytest.mark.parametrize(
    ("spec", "expected_extra"),
    [
        pytest.param({}, {}, id="minimal"),
        pytest.param(
            {"training": {"maxSteps": 5, "resolution": 32, "lora": {"rank": 4}}},
            {"training": {"maxSteps": 5, "resolution": 32, "lora": {"rank": 4}}},
            id="training-passthrough",
        ),
        pytest.param(
            {"priorPreservation": {"enabled": True, "classPrompt": "a photo of a cat", "numImages": 2}},
            {"priorPreservation": {"enabled": True, "classPrompt": "a photo of a cat", "numImages": 2}},
            id="prior-passthrough",
        ),
        pytest.param(
            {
                "storage": {
                    "endpoint": "http://127.0.0.1:8333",
                    "region": "us-east-1",
                    "addressingStyle": "path",
                    "credentialsSecret": {"name": "s3-creds"},
                }
            },
            {"storage": {"endpoint": "http://127.0.0.1:8333", "region": "us-east-1", "addressingStyle": "path"}},
            id="storage-without-credentials",
        ),
        pytest.param(
            {
                "resources": {"gpus": 2, "nodes": 2},
                "runPolicy": {"backoffLimit": 3},
                "podTemplate": {"image": "x"},
                "storage": {"credentialsSecret": {"name": "s"}},
            },
            {},
            id="operator-sections-dropped",
        ),
    ],
)
def test_build_trainer_config(spec: dict[str, Any], expected_extra: dict[str, Any]) -> None:
    job = _job(**spec)
    expected = {
        "name": "cat",
        "namespace": "team-a",
        "baseModel": {"tiny": True},
        "instanceImages": {"uri": "s3://bucket/cat/", "prompt": "a photo of sks cat"},
        "output": {"uri": "s3://bucket/out/cat"},
        **expected_extra,
    }
    assert build_trainer_config(job) == expected
    # The trainer accepts what we produce (it validates again at start-up).
    parse_job_config(build_trainer_config(job))


def test_input_not_mutated_and_output_independent() -> None:
    job = _job(training={"maxSteps": 5})
    before = copy.deepcopy(job)
    config = build_trainer_config(job)
    config["training"]["maxSteps"] = 99
    assert job == before


def test_render_is_canonical_json() -> None:
    a = _job(training={"maxSteps": 5, "resolution": 32})
    b = _job(training={"resolution": 32, "maxSteps": 5})
    assert render_trainer_config(a) == render_trainer_config(b)
    assert json.loads(render_trainer_config(a)) == build_trainer_config(a)

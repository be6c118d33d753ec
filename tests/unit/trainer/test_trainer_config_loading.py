"""Loading the trainer's JobConfig: a file, or DREAMBOOTH_CONFIG as inline JSON/YAML or a path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dreambooth_api.config import ConfigError, load_job_config
from dreambooth_api.env import CONFIG as CONFIG_ENV

DOC = {
    "name": "cat",
    "instanceImages": {"uri": "s3://bucket/subjects/cat/", "prompt": "a photo of sks cat"},
    "output": {"uri": "s3://bucket/models/cat"},
    "training": {"maxSteps": 40},
}


def test_inline_json_as_the_operator_passes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, json.dumps(DOC))
    config = load_job_config()
    assert (config.name, config.training.max_steps) == ("cat", 40)


def test_inline_yaml_with_a_line_longer_than_a_file_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-line value is tried as a path first; a name too long for the file system is a document, not an error."""
    prompt = "a photo of sks cat " + "on a sunny day " * 25
    doc = {**DOC, "instanceImages": {**DOC["instanceImages"], "prompt": prompt.strip()}}  # type: ignore[dict-item]
    monkeypatch.setenv(CONFIG_ENV, yaml.safe_dump(doc, width=10_000, default_flow_style=True).strip())
    assert len(load_job_config().instance_images.prompt) > 300
    monkeypatch.setenv(CONFIG_ENV, yaml.safe_dump(doc, width=10_000))
    assert load_job_config().instance_images.prompt == prompt.strip()


def test_a_yaml_flow_mapping_is_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        CONFIG_ENV, "{name: cat, instanceImages: {uri: 's3://bucket/p/', prompt: sks}, output: {uri: 's3://bucket/o'}}"
    )
    assert load_job_config().output.uri == "s3://bucket/o"


def test_a_path_in_the_variable_and_a_file_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(DOC))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_job_config().name == "cat"
    monkeypatch.delenv(CONFIG_ENV)
    assert load_job_config(path).name == "cat"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, CONFIG_ENV),
        ("[1, 2]", "must be a mapping"),
        ('{"name": "cat", "training": {"maxSteps": 0}}', "training.maxSteps"),
        ("name: [unclosed", "not valid JSON or YAML"),
    ],
)
def test_bad_configs_are_config_errors_that_say_why(
    value: str | None, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv(CONFIG_ENV, raising=False)
    else:
        monkeypatch.setenv(CONFIG_ENV, value)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_job_config()

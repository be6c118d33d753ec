"""Job YAML is read as kubectl reads it: `1e-4` is a float (YAML 1.2), not the string PyYAML's YAML 1.1 makes of
it, so a manifest that `kubectl apply` accepts also passes the strict models in `dreambooth run --local`/`submit`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dreambooth_api import yamlio
from dreambooth_api.config import load_job_config
from dreambooth_cli.manifest import load_job_manifest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-4", 1e-4),
        ("1.0e-4", 1e-4),
        ("-2E3", -2000.0),
        (".5", 0.5),
        ("3", 3),
        ("'1e-4'", "1e-4"),
        ("1e", "1e"),
        ("1.2.3", "1.2.3"),
        ("true", True),
        (".inf", float("inf")),
    ],
)
def test_scalars_resolve_as_kubernetes_reads_them(text: str, value: object) -> None:
    got = yamlio.safe_load(f"v: {text}")["v"]
    assert got == value
    assert type(got) is type(value)


def test_pyyaml_alone_reads_the_short_float_as_a_string() -> None:
    """What the loader is for: without it the strict Float type refuses the manifest."""
    assert yaml.safe_load("v: 1e-4")["v"] == "1e-4"


def test_a_job_with_a_short_float_loads_in_the_cli_and_the_trainer(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        "apiVersion: dreambooth.dev/v1alpha1\nkind: DreamBoothJob\nmetadata:\n  name: short-float\nspec:\n"
        "  instanceImages:\n    uri: file:///tmp/images\n  instancePrompt: a photo of sks dog\n"
        "  output:\n    uri: file:///tmp/out\n  training:\n    learningRate: 1e-4\n"
    )
    job = load_job_manifest(manifest)
    assert job["spec"]["training"]["learningRate"] == pytest.approx(1e-4)
    config = tmp_path / "config.yaml"
    config.write_text(
        "instanceImages:\n  uri: file:///tmp/images\n  prompt: a photo of sks dog\n"
        "output:\n  uri: file:///tmp/out\ntraining:\n  learningRate: 1e-4\n"
    )
    assert load_job_config(config).training.learning_rate == pytest.approx(1e-4)

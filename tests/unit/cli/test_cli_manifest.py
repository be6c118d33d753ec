"""Reading a DreamBoothJob file: one-line errors with the file, the line or the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dreambooth_api import constants as api
from dreambooth_cli import manifest
from dreambooth_cli.errors import ExitStatus, InputError
from dreambooth_cli.openapi import validate
from tests.infra.paths import ROOT

GOOD = f"""\
apiVersion: {api.API_VERSION}
kind: {api.JOB_KIND}
metadata:
  name: toy
spec:
  instanceImages:
    uri: s3://photos/toy/
    prompt: a photo of sks toy
  training:
    maxSteps: 20
  output:
    uri: s3://models/toy
"""

# A CRD schema written for these tests: the validator must apply what a generated CRD says.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["instanceImages", "output"],
            "properties": {
                "instanceImages": {
                    "type": "object",
                    "properties": {
                        "uri": {"type": "string", "pattern": "^(s3|file)://", "nullable": True},
                        "prompt": {"type": "string", "minLength": 1},
                    },
                },
                "training": {
                    "type": "object",
                    "properties": {
                        "maxSteps": {"type": "integer", "minimum": 1, "maximum": 1000000},
                        "method": {"type": "string", "enum": ["full", "lora"]},
                        "resolution": {"type": "integer", "multipleOf": 8},
                        "learningRate": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                    },
                },
                "output": {"type": "object", "properties": {"uri": {"type": "string"}}},
                "podTemplate": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    },
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_good_manifest_loads(tmp_path: Path) -> None:
    job = manifest.load_job_manifest(write(tmp_path, GOOD))
    assert job["metadata"]["name"] == "toy"
    assert manifest.schema_errors(job, SCHEMA) == []


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.yaml: file not found") as err:
        manifest.load_job_manifest(tmp_path / "nope.yaml")
    assert err.value.status == ExitStatus.INVALID_INPUT


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    broken = GOOD.replace("    maxSteps: 20", "    maxSteps: [20")
    with pytest.raises(InputError) as err:
        manifest.load_job_manifest(write(tmp_path, broken))
    line = broken.splitlines().index("    maxSteps: [20") + 1
    assert "invalid YAML" in err.value.message
    # The parser notices the unclosed list on the next line at the latest.
    reported = int(err.value.message.split("job.yaml:")[1].split(":")[0])
    assert line <= reported <= line + 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace(f"kind: {api.JOB_KIND}", "kind: Pod"), "expected a DreamBoothJob, found Pod"),
        (GOOD.replace(api.API_VERSION, "dreambooth.dev/v9"), "apiVersion: must be dreambooth.dev/v1alpha1"),
        (GOOD.replace("name: toy", "name: Toy_1"), "metadata.name: 'Toy_1' must be a DNS label"),
        (GOOD + "---\n" + GOOD, "expected one DreamBoothJob, found 2"),
        (GOOD.split("spec:")[0], "spec: required field is missing"),
    ],
)
def test_envelope_errors(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        manifest.load_job_manifest(write(tmp_path, text))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"training": {"maxSteps": 0}}, "spec.training.maxSteps: 0 must be >= 1"),
        ({"training": {"maxSteps": "ten"}}, "spec.training.maxSteps: must be of type integer, got str"),
        ({"training": {"method": "dora"}}, "spec.training.method: unsupported value 'dora'"),
        ({"training": {"resolution": 30}}, "spec.training.resolution: 30 must be a multiple of 8"),
        ({"training": {"learningRate": 0}}, "spec.training.learningRate: 0 must be > 0"),
        ({"training": {"maxStep": 3}}, "spec.training.maxStep: unknown field"),
        ({"instanceImages": {"uri": "http://x", "prompt": "p"}}, "spec.instanceImages.uri: 'http://x' does not match"),
        ({"instanceImages": {"uri": None, "prompt": ""}}, "spec.instanceImages.prompt: must be at least 1"),
        ({"output": None}, "spec.output: must not be null"),
    ],
)
def test_schema_violations_name_the_field(change: dict[str, Any], expected: str) -> None:
    job = yaml.safe_load(GOOD)
    job["spec"].update(change)
    errors = manifest.schema_errors(job, SCHEMA)
    assert any(e.startswith(expected) for e in errors), errors


def test_preserve_unknown_fields_and_missing_required() -> None:
    spec = {"instanceImages": {"prompt": "p"}, "podTemplate": {"anything": {"goes": 1}}}
    assert validate(spec, SCHEMA["properties"]["spec"], "spec") == ["spec.output: required field is missing"]


def test_check_schema_uses_the_crd_named_by_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "spec": {
            "group": api.GROUP,
            "names": {"kind": api.JOB_KIND, "plural": api.JOB_PLURAL},
            "versions": [{"name": api.VERSION, "schema": {"openAPIV3Schema": SCHEMA}}],
        },
    }
    crd_path = tmp_path / "crd.yaml"
    crd_path.write_text(yaml.safe_dump(crd))
    monkeypatch.setenv(manifest.CRD_ENV, str(crd_path))
    path = write(tmp_path, GOOD.replace("maxSteps: 20", "maxSteps: -1"))
    job = manifest.load_job_manifest(path)
    with pytest.raises(InputError, match=r"schema violation \(CRD schema crd\.yaml\): spec\.training\.maxSteps"):
        manifest.check_schema(path, job)
    ok = write(tmp_path, GOOD)
    assert "validated against the CRD schema" in manifest.check_schema(ok, manifest.load_job_manifest(ok))


def test_generated_crd_accepts_the_demo_job_and_rejects_a_bad_step_count() -> None:
    root = ROOT
    source = manifest.find_crd_schema(root / "crds")
    assert source is not None, "crds/ holds no generated CRD (make crds)"
    job = manifest.load_job_manifest(root / "examples" / "demo-job.yaml")
    assert manifest.schema_errors(job, source.schema) == []
    job["spec"]["training"]["maxSteps"] = 0
    assert any(e.startswith("spec.training.maxSteps:") for e in manifest.schema_errors(job, source.schema))

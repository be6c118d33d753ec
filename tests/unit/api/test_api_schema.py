"""Properties of the generated CRD schemas: structural, described, defaulted like the models, rules with messages."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, Field

from dreambooth_api import common, inference, job
from dreambooth_api import config as trainer_config
from dreambooth_api.generate import crds, inference_crd, job_crd
from dreambooth_api.schema import Schema, model_json_schema, to_structural, walk

# Free-form Kubernetes sub-objects: the only places that keep unknown fields.
PRESERVE_UNKNOWN_ALLOWED = {
    "spec.podTemplate.affinity",
    "spec.podTemplate.env[].valueFrom",
    "spec.vlm.extraBody",  # provider-specific request fields, passed to the VLM endpoint as they are
}
STRUCTURAL_FORBIDDEN_KEYS = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "title", "definitions", "const"}


def _version_schema(crd: dict[str, Any]) -> Schema:
    schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(crd: dict[str, Any]) -> list[tuple[str, Schema]]:
    root = _version_schema(crd)
    return walk(root["properties"]["spec"], "spec") + walk(root["properties"]["status"], "status")


CRDS = pytest.mark.parametrize("crd", crds(), ids=lambda c: c["spec"]["names"]["kind"])


@CRDS
def test_every_field_has_a_description(crd: dict[str, Any]) -> None:
    missing = [path for path, node in _nodes(crd) if not node.get("description") and not path.endswith(("[]", "{}"))]
    assert missing == []


@CRDS
def test_schema_is_structural(crd: dict[str, Any]) -> None:
    for path, node in _nodes(crd):
        assert not STRUCTURAL_FORBIDDEN_KEYS & node.keys(), path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
        else:
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        if node.get("type") == "array":
            assert "items" in node, path


@CRDS
def test_unknown_fields_are_preserved_only_for_free_form_kubernetes_objects(crd: dict[str, Any]) -> None:
    preserved = {path for path, node in _nodes(crd) if node.get("x-kubernetes-preserve-unknown-fields")}
    assert preserved <= PRESERVE_UNKNOWN_ALLOWED


@CRDS
def test_every_rule_has_a_message_and_status_has_no_defaults(crd: dict[str, Any]) -> None:
    for path, node in _nodes(crd):
        for rule in node.get("x-kubernetes-validations", []):
            assert set(rule) == {"rule", "message"}, path
            assert rule["message"].strip(), path
        if path.startswith("status"):
            assert "default" not in node, path


@CRDS
def test_printer_columns_point_at_schema_fields(crd: dict[str, Any]) -> None:
    root = _version_schema(crd)
    paths = {f".{path}" for path, _ in walk(root["properties"]["status"], "status")}
    for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".status"):
            assert column["jsonPath"] in paths, column


def _apply_defaults(schema: Schema, value: Any) -> Any:
    """The API server's structural defaulting, enough for these schemas: fill missing fields, then recurse."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = sub["default"]
            if name in out:
                out[name] = _apply_defaults(sub, out[name])
        return out
    if isinstance(value, list) and "items" in schema:
        return [_apply_defaults(schema["items"], v) for v in value]
    return value


def _spec_schema(crd: dict[str, Any]) -> Schema:
    spec: Schema = _version_schema(crd)["properties"]["spec"]
    return spec


@pytest.mark.parametrize(
    ("field", "model", "minimal"),
    [
        ("training", trainer_config.TrainingConfig, {}),
        ("priorPreservation", trainer_config.PriorPreservationSpec, {}),
        ("output", trainer_config.OutputSpec, {"uri": "s3://bucket/out"}),
        ("instanceImages", trainer_config.InstanceImagesSpec, {"uri": "s3://bucket/in", "prompt": "a sks dog"}),
        ("baseModel", trainer_config.BaseModelSpec, {"tiny": True}),
    ],
)
def test_schema_defaults_equal_trainer_model_defaults(
    field: str, model: type[BaseModel], minimal: dict[str, Any]
) -> None:
    schema = _spec_schema(job_crd())["properties"][field]
    defaulted = _apply_defaults(schema, minimal)
    expected = model.model_validate(minimal).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert defaulted == expected


@pytest.mark.parametrize(
    ("crd", "field", "model", "minimal"),
    [
        (job_crd(), "storage", common.StorageSpec, {}),
        (job_crd(), "resources", job.JobResources, {}),
        (job_crd(), "runPolicy", job.RunPolicy, {}),
        (inference_crd(), "server", inference.ServerLimits, {}),
        (inference_crd(), "resources", inference.InferenceResources, {}),
        (inference_crd(), "scaling", inference.Scaling, {}),
    ],
)
def test_schema_defaults_equal_operator_model_defaults(
    crd: dict[str, Any], field: str, model: type[BaseModel], minimal: dict[str, Any]
) -> None:
    schema = _spec_schema(crd)["properties"][field]
    assert schema["default"] == {}
    expected = model.model_validate(minimal).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert _apply_defaults(schema, minimal) == expected


def test_trainer_sections_carry_trainer_rules_and_immutability() -> None:
    spec = _spec_schema(job_crd())
    messages = {
        name: [r["message"] for r in spec["properties"][name].get("x-kubernetes-validations", [])]
        for name in job.TRAINER_SECTIONS
    }
    assert "baseModel needs exactly one of id, uri or tiny: true" in messages["baseModel"]
    assert "instanceImages needs exactly one of uri or files" in messages["instanceImages"]
    assert "training.lora is only allowed with method: lora" in messages["training"]
    for name in job.IMMUTABLE_FIELDS:
        node = spec["properties"][name]
        assert {"rule": "self == oldSelf", "message": f"{name} is immutable"} in node["x-kubernetes-validations"]
    for name in ("storage", "podTemplate", "runPolicy"):
        assert all("oldSelf" not in r["rule"] for r in spec["properties"][name].get("x-kubernetes-validations", []))


def test_inference_base_model_is_the_trainer_schema() -> None:
    model = _spec_schema(inference_crd())["properties"]["model"]
    base = model["properties"]["baseModel"]
    assert set(base["properties"]) == {f.alias or n for n, f in trainer_config.BaseModelSpec.model_fields.items()}
    assert [r["message"] for r in base["x-kubernetes-validations"]] == [
        "baseModel needs exactly one of id, uri or tiny: true"
    ]
    assert "default" not in base


def test_trainer_section_properties_come_from_the_trainer_model() -> None:
    training = _spec_schema(job_crd())["properties"]["training"]
    assert set(training["properties"]) == {
        f.alias or name for name, f in trainer_config.TrainingConfig.model_fields.items()
    }
    assert training["properties"]["method"]["enum"] == [m.value for m in trainer_config.Method]


# ---- the converter on small models --------------------------------------------------------------------------


class _Inner(common.ApiModel):
    """Inner doc."""

    size: int = Field(default=3, ge=1)
    """Size."""


class _Sample(common.ApiModel):
    """Sample doc."""

    optional_none: int | None = None
    """Unset means unset: not nullable."""
    null_means_off: int | None = Field(default=10, gt=0)
    """Null turns it off: nullable, exclusive minimum."""
    quantity: common.Quantity = 1
    """Int or string."""
    free: dict[str, Any] | None = None
    """Free form."""
    labels: dict[str, str] = Field(default_factory=dict)
    """String map."""
    inner: _Inner = Field(default_factory=_Inner)
    """A nested model with defaults."""
    names: list[str] = Field(default_factory=lambda: ["a", "b"])
    """A list default from a factory."""


def _sample_schema() -> Schema:
    return to_structural(model_json_schema(_Sample), rules_by_title={"_Inner": [common.cel("self.size > 0", "m")]})


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("optionalNone", {"description": "Unset means unset: not nullable.", "type": "integer"}),
        (
            "nullMeansOff",
            {
                "description": "Null turns it off: nullable, exclusive minimum.",
                "type": "integer",
                "nullable": True,
                "default": 10,
                "minimum": 0,
                "exclusiveMinimum": True,
            },
        ),
        (
            "quantity",
            {
                "description": "Int or string.",
                "x-kubernetes-int-or-string": True,
                "default": 1,
                "pattern": common.QUANTITY_PATTERN,
            },
        ),
        ("free", {"description": "Free form.", "type": "object", "x-kubernetes-preserve-unknown-fields": True}),
        (
            "labels",
            {"description": "String map.", "type": "object", "default": {}, "additionalProperties": {"type": "string"}},
        ),
        (
            "inner",
            {
                "description": "A nested model with defaults.",
                "type": "object",
                "default": {},
                "properties": {"size": {"description": "Size.", "type": "integer", "default": 3, "minimum": 1}},
                "x-kubernetes-validations": [{"rule": "self.size > 0", "message": "m"}],
            },
        ),
        (
            "names",
            {
                "description": "A list default from a factory.",
                "type": "array",
                "default": ["a", "b"],
                "items": {"type": "string"},
            },
        ),
    ],
)
def test_converter_field_forms(field: str, expected: Schema) -> None:
    assert _sample_schema()["properties"][field] == expected


def test_converter_without_defaults_drops_them_everywhere() -> None:
    schema = to_structural(model_json_schema(_Sample), keep_defaults=False)
    assert all("default" not in node for _, node in walk(schema))


def test_set_condition_keeps_transition_time_when_status_is_unchanged() -> None:
    from datetime import UTC, datetime

    t0, t1 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    running = common.Condition(type="Running", status="True", reason="PodsRunning", last_transition_time=t0)
    same = running.model_copy(update={"message": "still", "last_transition_time": t1})
    flipped = running.model_copy(update={"status": "False", "reason": "Preempted", "last_transition_time": t1})

    kept = common.set_condition([running], same)
    assert kept[0].last_transition_time == t0
    assert kept[0].message == "still"
    assert common.set_condition([running], flipped)[0].last_transition_time == t1
    added = common.set_condition([running], flipped.model_copy(update={"type": "Failed"}))
    assert [c.type for c in added] == ["Running", "Failed"]
    assert common.find_condition(added, "Failed") is not None
    assert common.find_condition(added, "Succeeded") is None

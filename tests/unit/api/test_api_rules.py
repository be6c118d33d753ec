"""Cross-field rules that exist as a CEL rule in the CRD and as Python: both forms agree on the same cases.

"The lora export format needs method lora" is defined once, `config.lora_export_allowed`; the CRD's CEL rule
(`job.SPEC_RULES`), the operator's twin (`DreamBoothJobSpec.cross_section_errors`) and the trainer's validator are
checked against it on every combination, after the API server's defaulting (from the generated schema), as the API
server evaluates rules. The CEL subset our rules use is evaluated by translating it to Python.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from dreambooth_api import job
from dreambooth_api.config import LORA_EXPORT_MESSAGE, ConfigError, lora_export_allowed, parse_job_config
from dreambooth_api.generate import job_crd
from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_api.schema import Schema

METHODS = [None, "lora", "full"]
FORMATS = [None, ["diffusers"], ["lora"], ["diffusers", "lora"], ["safetensors", "lora"], ["safetensors"]]
TRAINING_LORA_MESSAGE = "training.lora is only allowed with method: lora"


class _Self:
    """A CEL `self`: fields as attributes (a missing one is an error, as in CEL), lists and scalars as they are."""

    def __init__(self, value: dict[str, Any]) -> None:
        self._value = value

    def __getattr__(self, name: str) -> Any:
        item = self._value[name]  # KeyError: CEL's "no such key"
        return _Self(item) if isinstance(item, dict) else item


def _has(obj: _Self, path: str) -> bool:
    value: Any = obj._value
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def cel(rule: str, value: dict[str, Any]) -> bool:
    """Evaluate a rule of the subset our CRDs use: has(), !, &&, ||, ==, !=, in, parentheses and string literals."""
    assert re.fullmatch(r"[\w.'()!=|&<> ,]+", rule), f"outside the supported subset: {rule}"
    expr = re.sub(r"has\(self((?:\.\w+)+)\)", lambda m: f"_has(self, {m[1][1:]!r})", rule)
    expr = re.sub(r"!(?!=)", " not ", expr.replace("&&", " and ").replace("||", " or "))
    return bool(eval(expr, {"__builtins__": {}, "_has": _has}, {"self": _Self(value)}))  # noqa: S307 - our own rules


def _apply_defaults(schema: Schema, value: Any) -> Any:
    """The API server's structural defaulting: fill missing fields that have a default, then recurse."""
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


def _spec(method: str | None, formats: list[str] | None, lora: bool = False) -> dict[str, Any]:
    """A DreamBoothJob spec as the API server stores it (defaults filled in)."""
    output: dict[str, Any] = {"uri": "s3://bucket/out"}
    if formats is not None:
        output["formats"] = formats
    training: dict[str, Any] = {} if method is None else {"method": method}
    if lora:
        training["lora"] = {"rank": 4}
    spec = {
        "baseModel": {"tiny": True},
        "instanceImages": {"uri": "s3://bucket/in", "prompt": "a sks dog"},
        "training": training,
        "output": output,
    }
    schema: Schema = job_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    defaulted: dict[str, Any] = _apply_defaults(schema, spec)
    return defaulted


def _trainer_error(spec: dict[str, Any]) -> str:
    try:
        parse_job_config(DreamBoothJobSpec.model_validate(spec).trainer_config("job", "default"))
    except ConfigError as err:
        return str(err)
    return ""


@pytest.mark.parametrize("formats", FORMATS, ids=lambda f: "+".join(f) if f else "default")
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m or "default")
def test_lora_export_rule_agrees_in_cel_the_operator_and_the_trainer(method: str | None, formats: list[str]) -> None:
    spec = _spec(method, formats)
    allowed = lora_export_allowed(spec["output"]["formats"], spec["training"]["method"])
    [rule] = [r for r in job.SPEC_RULES if r["message"] == LORA_EXPORT_MESSAGE]
    assert cel(rule["rule"], spec) is allowed
    assert (LORA_EXPORT_MESSAGE not in DreamBoothJobSpec.model_validate(spec).cross_section_errors()) is allowed
    assert (LORA_EXPORT_MESSAGE not in _trainer_error(spec)) is allowed


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m or "default")
def test_lora_settings_rule_agrees_in_cel_and_the_trainer(method: str | None, lora: bool) -> None:
    spec = _spec(method, ["diffusers"], lora=lora)
    [rule] = [r for r in job.TRAINER_RULES["TrainingConfig"] if r["message"] == TRAINING_LORA_MESSAGE]
    allowed = not lora or spec["training"]["method"] == "lora"
    assert cel(rule["rule"], spec["training"]) is allowed
    assert (TRAINING_LORA_MESSAGE not in _trainer_error(spec)) is allowed


def test_the_cel_subset_evaluator() -> None:
    value = {"a": {"b": "x", "n": [1]}, "c": True}
    assert cel("has(self.a.b) && self.a.b == 'x' && !(2 in self.a.n) || !self.c", value)
    assert not cel("has(self.a.z) || self.a.b != 'x'", value)
    with pytest.raises(KeyError):
        cel("self.missing == 'x'", value)

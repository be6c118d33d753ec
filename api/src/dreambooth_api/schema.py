"""Pydantic JSON schema -> Kubernetes structural OpenAPI v3 schema.

Kubernetes accepts a subset of OpenAPI v3 for CRDs ("structural" schemas): no `$ref`, a `type` on every node,
`nullable` instead of a null variant, `exclusiveMinimum` as a flag, and a few `x-kubernetes-*` extensions.
`to_structural` rewrites what pydantic emits into that subset:

- `$ref`/`$defs` are inlined, and single-item `allOf` wrappers merged.
- `anyOf: [X, null]` becomes X. It is `nullable: true` only where null means something other than "unset":
  when the default is not null (for example `intervalSteps: null` turns checkpoints off) or the field is
  required. An optional field whose default is null is simply left out of `required`, and a null written
  by a user is pruned by the API server, as for built-in types.
- `anyOf: [integer, string]` (resource quantities) becomes `x-kubernetes-int-or-string: true`.
- A free-form object (`dict[str, Any]`) gets `x-kubernetes-preserve-unknown-fields: true`; that is the only
  place it is used.
- Defaults come from `default` and from `default_factory` (a model default becomes `{}`, so that the API
  server fills in the nested defaults).
- `title` and `additionalProperties: false` are dropped (the API server prunes unknown fields; strict
  field validation reports them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

Schema = dict[str, Any]

# Output key order, so that generated YAML reads well and is stable.
_KEY_ORDER = (
    "description",
    "type",
    "format",
    "nullable",
    "x-kubernetes-int-or-string",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
)
_DROPPED = frozenset({"title", "$defs", "$schema"})


class SchemaError(ValueError):
    """The pydantic schema uses a construct that has no structural equivalent."""


class _WithFactoryDefaults(GenerateJsonSchema):
    """Also emits defaults that come from a `default_factory` (pydantic leaves those out)."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()  # type: ignore[call-arg]
            return {} if isinstance(value, BaseModel) else value
        return super().get_default_value(schema)


def model_json_schema(model: type[BaseModel]) -> Schema:
    """The pydantic JSON schema (validation mode, camelCase aliases, factory defaults included)."""
    return model.model_json_schema(by_alias=True, mode="validation", schema_generator=_WithFactoryDefaults)


def to_structural(
    schema: Schema,
    *,
    keep_defaults: bool = True,
    rules_by_title: Mapping[str, list[dict[str, str]]] | None = None,
) -> Schema:
    """Convert a pydantic JSON schema (with its `$defs`) into a structural schema.

    `rules_by_title` adds `x-kubernetes-validations` to every object whose model title matches (how CEL rules
    are attached to models that are not ours to annotate, such as the trainer's).
    """
    return _Converter(schema.get("$defs", {}), keep_defaults, rules_by_title or {}).convert(schema)


class _Converter:
    def __init__(self, defs: Mapping[str, Schema], keep_defaults: bool, rules: Mapping[str, list[dict[str, str]]]):
        self.defs = defs
        self.keep_defaults = keep_defaults
        self.rules = rules

    def convert(self, node: Schema) -> Schema:
        node = self._flatten(node)
        out: Schema = self._convert_any_of(node) if "anyOf" in node else {}
        for key, value in node.items():
            if key not in _DROPPED and key not in ("anyOf", "$ref", "allOf"):
                self._convert_key(out, key, value)

        title = node.get("title")
        if isinstance(title, str) and title in self.rules and out.get("type") == "object":
            out["x-kubernetes-validations"] = [*out.get("x-kubernetes-validations", []), *self.rules[title]]
        if "x-kubernetes-validations" in out:
            out["x-kubernetes-validations"] = [_rule_ordered(r) for r in out["x-kubernetes-validations"]]
        if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
            out["x-kubernetes-preserve-unknown-fields"] = True
        if out.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
        return _ordered(out)

    def _convert_any_of(self, node: Schema) -> Schema:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        has_null = len(variants) < len(node["anyOf"])
        types = sorted(str(self._flatten(v).get("type")) for v in variants)
        if len(variants) == 1:
            out = self.convert(variants[0])
            # Nullable only where null differs from unset: a non-null default, or a required field.
            if has_null and ("default" not in node or node["default"] is not None):
                out["nullable"] = True
            return out
        if types == ["integer", "string"]:
            return {"x-kubernetes-int-or-string": True}
        raise SchemaError(f"unsupported anyOf (no structural form): {node['anyOf']}")

    def _convert_key(self, out: Schema, key: str, value: Any) -> None:
        if key == "properties":
            out["properties"] = {name: self.convert(sub) for name, sub in value.items()}
        elif key == "items":
            out["items"] = self.convert(value)
        elif key == "additionalProperties":
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif value is not False:
                out["additionalProperties"] = self.convert(value)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "default":
            if value is not None and self.keep_defaults:
                out["default"] = value
        elif key == "x-kubernetes-validations":
            out[key] = [*out.get(key, []), *value]
        else:
            out[key] = value

    def _flatten(self, node: Schema) -> Schema:
        """Inline a `$ref` or a single-item `allOf`; the referring node's own keys win."""
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name not in self.defs:
                raise SchemaError(f"unresolved $ref {node['$ref']}")
            target = self._flatten(self.defs[name])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return _merge(target, rest)
        if "allOf" in node and len(node["allOf"]) == 1:
            rest = {k: v for k, v in node.items() if k != "allOf"}
            return _merge(self._flatten(node["allOf"][0]), rest)
        return node


def _merge(target: Schema, overrides: Schema) -> Schema:
    merged = dict(target)
    for key, value in overrides.items():
        if key == "x-kubernetes-validations":
            merged[key] = [*merged.get(key, []), *value]
        elif key == "title" and "title" in merged:
            continue  # keep the model's title, which rules_by_title matches
        else:
            merged[key] = value
    return merged


def _rule_ordered(rule: dict[str, str]) -> dict[str, str]:
    return {
        "rule": rule["rule"],
        "message": rule["message"],
        **{k: v for k, v in rule.items() if k not in ("rule", "message")},
    }


def _ordered(node: Schema) -> Schema:
    known = {k: node[k] for k in _KEY_ORDER if k in node}
    unknown = {k: node[k] for k in sorted(node) if k not in known}
    return {**known, **unknown}


def walk(schema: Schema, path: str = "") -> list[tuple[str, Schema]]:
    """Every node of a structural schema with its dotted path (`[]` for list items, `{}` for map values)."""
    found = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        found += walk(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        found += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += walk(schema["additionalProperties"], f"{path}{{}}")
    return found

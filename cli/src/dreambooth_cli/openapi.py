"""A small validator for the structural OpenAPI v3 subset that CRD schemas use.

It checks what the API server checks from the schema itself: types, required fields, unknown fields, enums,
ranges, lengths, patterns, item counts and multipleOf. CEL rules (x-kubernetes-validations) are not evaluated
here; the API server (submit, dry-run) and the trainer (local runs) check them.
"""

from __future__ import annotations

import re
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
}


def _type_ok(value: Any, expected: str) -> bool:
    if expected in ("integer", "number") and isinstance(value, bool):
        return False
    if expected == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(expected, (object,)))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _check_scalar(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(repr(v) for v in schema["enum"])
        errors.append(f"{path}: unsupported value {value!r}: must be one of {allowed}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema:
            low = schema["minimum"]
            if value < low or (schema.get("exclusiveMinimum") is True and value == low):
                errors.append(f"{path}: {value} must be {'>' if schema.get('exclusiveMinimum') else '>='} {low}")
        if "maximum" in schema:
            high = schema["maximum"]
            if value > high or (schema.get("exclusiveMaximum") is True and value == high):
                errors.append(f"{path}: {value} must be {'<' if schema.get('exclusiveMaximum') else '<='} {high}")
        multiple = schema.get("multipleOf")
        if multiple and (value / multiple) % 1 != 0:
            errors.append(f"{path}: {value} must be a multiple of {multiple}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: must be at least {schema['minLength']} characters long")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: must be at most {schema['maxLength']} characters long")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            errors.append(f"{path}: {value!r} does not match {schema['pattern']!r}")
    return errors


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Every violation of `schema` by `value`, each as `field.path: message`."""
    if value is None:
        return [] if schema.get("nullable") else [f"{path}: must not be null"]
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str) or isinstance(value, bool):
            return [f"{path}: must be an integer or a string"]
        return []
    expected = schema.get("type")
    if expected and not _type_ok(value, expected):
        return [f"{path}: must be of type {expected}, got {type(value).__name__}"]
    errors = _check_scalar(value, schema, path)
    if isinstance(value, dict):
        errors += _check_object(value, schema, path)
    if isinstance(value, list):
        errors += _check_array(value, schema, path)
    return errors


def _check_object(value: dict[str, Any], schema: dict[str, Any], path: str) -> list[str]:
    errors: list[str] = []
    errors += [
        f"{_join(path, key)}: required field is missing" for key in schema.get("required", []) if key not in value
    ]
    properties: dict[str, Any] = schema.get("properties", {})
    additional = schema.get("additionalProperties")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
    for key, item in value.items():
        if key in properties:
            errors += validate(item, properties[key], _join(path, key))
        elif isinstance(additional, dict):
            errors += validate(item, additional, _join(path, key))
        elif properties and not preserve and additional is not True:
            errors.append(f"{_join(path, key)}: unknown field")
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        errors.append(f"{path}: must have at most {schema['maxProperties']} entries")
    return errors


def _check_array(value: list[Any], schema: dict[str, Any], path: str) -> list[str]:
    errors: list[str] = []
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(f"{path}: must have at least {schema['minItems']} items")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{path}: must have at most {schema['maxItems']} items")
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            errors += validate(item, items, _join(path, i))
    return errors

"""Declared tools and the subset of JSON Schema that tool parameters use.

Both the tool-call parser (to convert and check arguments) and the tool-call constraint (to
steer generation) read schemas through these helpers, so they agree on what a schema allows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

Schema = Mapping[str, Any]


def tool_parameters(tools: Sequence[Mapping[str, Any]]) -> dict[str, Schema]:
    """Function name -> parameters schema, from OpenAI-shaped tools or bare function specs."""
    declared: dict[str, Schema] = {}
    for tool in tools:
        function = tool.get("function", tool)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tool without a name: {tool!r}")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        declared[name] = parameters
    return declared


def schema_types(schema: Schema | None) -> frozenset[str]:
    """The JSON types a schema admits; empty when it does not say (anything goes)."""
    if not schema:
        return frozenset()
    declared = schema.get("type")
    if isinstance(declared, str):
        return frozenset([declared]) & frozenset(JSON_TYPES)
    if isinstance(declared, list):
        return frozenset(t for t in declared if t in JSON_TYPES)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            parts = [schema_types(s) for s in schema[key]]
            return frozenset() if any(not p for p in parts) else frozenset().union(*parts)
    if isinstance(schema.get("enum"), list):
        return frozenset(json_type(v) for v in schema["enum"])
    if "const" in schema:
        return frozenset([json_type(schema["const"])])
    return frozenset()


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not a JSON value: {value!r}")


def _type_matches(value: Any, wanted: str) -> bool:
    actual = json_type(value)
    if wanted == "number":
        return actual in ("integer", "number") and math.isfinite(value)
    if wanted == "integer":
        return actual == "integer" or (actual == "number" and float(value).is_integer())
    return actual == wanted


def schema_errors(value: Any, schema: Schema | None, where: str = "arguments") -> list[str]:
    """What in `value` breaks `schema`: types, enum/const, required, properties, items, anyOf."""
    if not schema:
        return []
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            if not any(not schema_errors(value, s, where) for s in schema[key]):
                return [f"{where}: matches none of {key}"]
    types = schema_types(schema) if "type" in schema else frozenset()
    if types and not any(_type_matches(value, t) for t in types):
        return [f"{where}: expected {' or '.join(sorted(types))}, got {json_type(value)}"]
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']!r}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: must be {schema['const']!r}"]
    errors: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                errors.append(f"{where}: missing required {name!r}")
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(item, properties[name], f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected {name!r}")
            elif isinstance(schema.get("additionalProperties"), Mapping):
                errors += schema_errors(item, schema["additionalProperties"], f"{where}.{name}")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors

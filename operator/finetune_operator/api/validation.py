"""Check a manifest the way the API server would: structural schema, defaults, CEL rules.

Used by `ftctl run` (so a local run rejects exactly what a cluster rejects) and by the tests.
Messages follow the API server's wording and always start with the field path.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any, Optional

import celpy

from . import KINDS
from .crd import openapi_schema
from .meta import API_VERSION


class ManifestError(ValueError):
    """A manifest the API server would reject; `errors` lists every field at fault."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


@functools.lru_cache(maxsize=None)
def _schema_for(kind: str) -> dict[str, Any]:
    for k in KINDS:
        if k.KIND == kind:
            return openapi_schema(k)
    raise KeyError(kind)


@functools.lru_cache(maxsize=256)
def _cel_program(rule: str):
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _fmt(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _type_ok(value: Any, expected: str) -> bool:
    if expected == "object":
        return isinstance(value, dict)
    if expected == "array":
        return isinstance(value, list)
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":  # the API server decodes integers as int64
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def _apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _apply_defaults(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        return [_apply_defaults(v, schema["items"]) for v in value]
    return value


def _check(value: Any, schema: dict[str, Any], path: str, old: Any, errors: list[str]) -> None:
    expected = schema.get("type")
    if expected and not _type_ok(value, expected):
        errors.append(f"{path}: Invalid value: {_fmt(value)}: {path} in body must be of type {expected}")
        return
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(_fmt(v) for v in schema["enum"])
        errors.append(f"{path}: Unsupported value: {_fmt(value)}: supported values: {allowed}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: Invalid value: {_fmt(value)}: {path} in body should match '{schema['pattern']}'")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: Invalid value: {_fmt(value)}: {path} in body should be at least {schema['minLength']} chars long")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: Too long: may not be longer than {schema['maxLength']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema:
            excl = schema.get("exclusiveMinimum") is True
            if value < schema["minimum"] or (excl and value == schema["minimum"]):
                op = "greater than" if excl else "greater than or equal to"
                errors.append(f"{path}: Invalid value: {value}: {path} in body should be {op} {schema['minimum']}")
        if "maximum" in schema:
            excl = schema.get("exclusiveMaximum") is True
            if value > schema["maximum"] or (excl and value == schema["maximum"]):
                op = "less than" if excl else "less than or equal to"
                errors.append(f"{path}: Invalid value: {value}: {path} in body should be {op} {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: Invalid value: {len(value)}: {path} in body should have at least {schema['minItems']} items")
        for i, item in enumerate(value):
            _check(item, schema.get("items", {}), f"{path}[{i}]", None, errors)
        if schema.get("x-kubernetes-list-type") == "set" and len({repr(v) for v in value}) != len(value):
            errors.append(f"{path}: Duplicate value: {path} must not contain duplicates")
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties")
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}.{name}: Required value")
        if props is not None:
            for name, sub in value.items():
                if name not in props:
                    # kubectl's default (--validate=strict) rejects unknown fields like this.
                    errors.append(f'{path}: unknown field "{path}.{name}"')
                else:
                    _check(sub, props[name], f"{path}.{name}", old.get(name) if isinstance(old, dict) else None, errors)
        elif isinstance(schema.get("additionalProperties"), dict):
            for name, sub in value.items():
                _check(sub, schema["additionalProperties"], f"{path}[{name}]", None, errors)
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue  # transition rules run on updates only
        try:
            activation = {"self": celpy.json_to_cel(value)}
            if transition:
                activation["oldSelf"] = celpy.json_to_cel(old)
        except ValueError:  # an integer beyond int64 inside: already reported as a type error above
            continue
        try:
            ok = bool(_cel_program(rule["rule"]).evaluate(activation))
        except celpy.CELEvalError as exc:  # the API server reports evaluation errors as Invalid too
            ok, rule = False, {**rule, "message": f"{rule.get('message', rule['rule'])} ({exc})"}
        if not ok:
            where = path + rule.get("fieldPath", "")
            errors.append(f"{where}: Invalid value: \"object\": {rule.get('message', rule['rule'])}")


def validate_manifest(manifest: dict[str, Any], old: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Return the manifest with schema defaults applied, or raise ManifestError naming every bad field."""
    if not isinstance(manifest, dict):
        raise ManifestError(["manifest must be a mapping"])
    if manifest.get("apiVersion") != API_VERSION:
        raise ManifestError([f"apiVersion: Unsupported value: {_fmt(manifest.get('apiVersion'))}: supported values: \"{API_VERSION}\""])
    try:
        schema = _schema_for(manifest.get("kind", ""))
    except KeyError:
        raise ManifestError([f"kind: Unsupported value: {_fmt(manifest.get('kind'))}: supported values: "
                             + ", ".join(_fmt(k.KIND) for k in KINDS)]) from None
    obj = _apply_defaults(copy.deepcopy(manifest), schema)
    old_obj = _apply_defaults(copy.deepcopy(old), schema) if old else None
    errors: list[str] = []
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    body_schema = {**schema, "properties": {k: v for k, v in schema["properties"].items()
                                            if k not in ("apiVersion", "kind", "metadata")}}
    for name, sub in body.items():
        if name not in body_schema["properties"]:
            errors.append(f'unknown field "{name}"')
        else:
            _check(sub, body_schema["properties"][name], name,
                   old_obj.get(name) if old_obj else None, errors)
    if "spec" not in obj:
        errors.append("spec: Required value")
    if not (obj.get("metadata") or {}).get("name"):
        errors.append("metadata.name: Required value: name or generateName is required")
    if errors:
        raise ManifestError(errors)
    return obj

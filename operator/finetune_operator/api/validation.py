"""Check a manifest the way the API server would: structural schema, defaults, CEL rules, metadata.

Used by `ftctl run` / `ftctl submit` (so a local run rejects exactly what a cluster rejects) and by
the tests; tests/realcluster/test_validation_differential.py holds it against a real API server.
Messages follow the API server's wording and always start with the field path. The server's order
of work is mirrored because it decides which errors are reported:

1. decoding, strict (what `kubectl apply` asks for): unknown fields are the only errors reported;
   then metadata of the wrong type (it decodes into metav1.ObjectMeta), alone too;
2. nulls of object and map fields are dropped (a field with a default then gets it), defaults applied;
3. metadata (name, generateName, namespace, labels, annotations, finalizers, ownerReferences) and the
   OpenAPI schema are checked, with Go's regexp semantics (RE2) and go-openapi's integer check;
4. CEL rules (x-kubernetes-validations) run only when step 3 found no "blocking" error: a wrong type,
   a missing required field, an unsupported enum value, a too-long string or too many items/properties.

On create the API server drops `status` (it is a subresource): only its unknown fields count. With
`old` (an update) transition rules run too. Not mirrored: validation ratcheting (on an update the
server ignores errors of fields left unchanged, which only matters for objects stored under an older,
looser schema).
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, Optional

import celpy
import re2  # google-re2 (celpy's own regex engine): the API server's Go regexps are RE2 too

from . import KINDS
from .crd import openapi_schema
from .meta import API_VERSION, DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, LABEL_VALUE_PATTERN

#: Error kinds after which the API server skips the CEL rules (its hasBlockingErr).
_BLOCKING = {"type", "unsupported", "required", "toolong", "toomany"}

#: metav1.ObjectMeta's fields: anything else under metadata is an unknown field.
_OBJECT_META_FIELDS = {
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
    "ownerReferences", "finalizers", "managedFields",
}
_SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                  "and must start and end with an alphanumeric character (e.g. 'example.com')")
_LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
              "start and end with an alphanumeric character (e.g. 'my-name')")
_QUALIFIED_NAME_PART = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
_ANNOTATIONS_MAX_BYTES = 256 * 1024


class ManifestError(ValueError):
    """A manifest the API server would reject; `errors` lists every field at fault (`fields`: their paths)."""

    def __init__(self, errors: list[str], fields: Optional[list[str]] = None):
        self.errors = errors
        self.fields = fields if fields is not None else [e.split(": ", 1)[0] for e in errors]
        super().__init__("; ".join(errors))


class _Errors:
    """(kind, field, message) triples, rendered as `field: message` like the API server's causes."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []

    def add(self, kind: str, field: str, message: str) -> None:
        self.items.append((kind, field, message))

    @property
    def blocking(self) -> bool:
        return any(kind in _BLOCKING for kind, _, _ in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_(self) -> None:
        raise ManifestError([f"{f}: {m}" for _, f, m in self.items], [f for _, f, _ in self.items])


@functools.lru_cache(maxsize=None)
def _schema_for(kind: str) -> dict[str, Any]:
    for k in KINDS:
        if k.KIND == kind:
            return openapi_schema(k)
    raise KeyError(kind)


def _scope_of(kind: str) -> str:
    return next(k.SCOPE for k in KINDS if k.KIND == kind)


@functools.lru_cache(maxsize=512)
def _regex(pattern: str):
    return re2.compile(pattern)


def _matches(pattern: str, value: str) -> bool:
    """Go regexp semantics (RE2): `$` is the end of the text, `\\s` is ASCII whitespace only."""
    return _regex(pattern).search(value) is not None


@functools.lru_cache(maxsize=256)
def _cel_program(rule: str):
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _fmt(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "integer" if isinstance(value, int) else "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _json_integer(value: float) -> bool:
    """go-openapi's IsFloat64AJSONInteger, which the type check uses: within +-(2^53 - 1), and integral up
    to a relative error of 1e-9 (so 16.000000001 passes as an integer; the int64 check then refuses it)."""
    if not math.isfinite(value) or abs(value) > 2**53 - 1:
        return False
    whole = float(math.trunc(value))
    if value == whole:
        return True
    return whole != 0 and abs(value - whole) / (abs(value) + abs(whole)) < 1e-9


def _int64(value: float) -> bool:
    return value.is_integer() and -(2**63) <= value < 2**63


def _type_ok(value: Any, expected: str) -> bool:
    if expected == "object":
        return isinstance(value, dict)
    if expected == "array":
        return isinstance(value, list)
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":  # the API server decodes integers as int64; 3.0 is an integer to it too
        if isinstance(value, float):
            return _json_integer(value)
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


# --- 1. strict decoding ------------------------------------------------------------------------

def _unknown_fields(value: Any, schema: Optional[dict[str, Any]], path: str, out: list[str]) -> None:
    """The API server's pruning walk (structural/pruning): a key of a mapping that the schema node does
    not declare is unknown, whatever the node's type (an object where a list belongs has only unknown
    keys); items of a list are walked with the node's `items` (none unless it is a list)."""
    if schema is not None and schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props = (schema or {}).get("properties", {})
        extra = (schema or {}).get("additionalProperties")
        for name, sub in value.items():
            where = f"{path}.{name}" if path else str(name)
            if name in props:
                _unknown_fields(sub, props[name], where, out)
            elif isinstance(extra, dict):
                _unknown_fields(sub, extra, where, out)
            else:
                out.append(where)
    elif isinstance(value, list):
        items = (schema or {}).get("items")
        for i, item in enumerate(value):
            _unknown_fields(item, items if isinstance(items, dict) else None, f"{path}[{i}]", out)


# --- 2. nulls and defaults ---------------------------------------------------------------------

def _apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name in value and value[name] is None and not sub.get("nullable"):
                del value[name]  # the API server prunes nulls of non-nullable fields before defaulting
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _apply_defaults(value[name], sub)
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        sub = schema["additionalProperties"]  # nulls of map values are pruned too (list items are not)
        return {k: _apply_defaults(v, sub) for k, v in value.items() if v is not None or sub.get("nullable")}
    elif isinstance(value, list) and "items" in schema:
        return [_apply_defaults(v, schema["items"]) for v in value]
    elif schema.get("type") == "integer" and isinstance(value, float) and _int64(value):
        return int(value)  # decoded as an int64 by the API server (and so seen by CEL rules)
    return value


# --- 3. metadata and schema --------------------------------------------------------------------

def _subdomain_errors(value: str) -> list[str]:
    out = []
    if len(value) > 253:
        out.append("must be no more than 253 characters")
    if not _matches(DNS_SUBDOMAIN_PATTERN, value):
        out.append(_SUBDOMAIN_MSG)
    return out


def _qualified_name_errors(value: str) -> list[str]:
    """The API server's IsQualifiedName (label, annotation and taint keys)."""
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            return ["prefix part must be non-empty"]
        if _subdomain_errors(prefix):
            return ["prefix part " + m for m in _subdomain_errors(prefix)]
    else:
        return ["a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and "
                "end with an alphanumeric character, with an optional DNS subdomain prefix and '/'"]
    if not name:
        return ["name part must be non-empty"]
    out = []
    if len(name) > 63:
        out.append("name part must be no more than 63 characters")
    if not _matches(_QUALIFIED_NAME_PART, name):
        out.append("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                   "with an alphanumeric character")
    return out


def _metadata_type_errors(meta: Any) -> list[tuple[str, str]]:
    """What fails to decode into metav1.ObjectMeta (the fields a manifest sets), as (field, message)."""
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return [("metadata", f"Invalid value: {_fmt(meta)}: metadata must be an object (metav1.ObjectMeta)")]
    out = []
    for field in ("name", "generateName", "namespace", "uid", "resourceVersion"):
        if meta.get(field) is not None and not isinstance(meta[field], str):
            out.append((f"metadata.{field}", f"Invalid value: {_fmt(meta[field])}: must be a string"))
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is not None and (not isinstance(value, dict)
                                  or not all(isinstance(v, str) or v is None for v in value.values())):
            out.append((f"metadata.{field}", f"Invalid value: {_fmt(value)}: must be a map of strings"))
    for field in ("finalizers", "ownerReferences"):
        value = meta.get(field)
        item = str if field == "finalizers" else dict
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, item) for v in value)):
            out.append((f"metadata.{field}",
                        f"Invalid value: {_fmt(value)}: must be a list of {'strings' if item is str else 'objects'}"))
    return out


def _check_metadata(meta: Any, kind: str, schema: dict[str, Any], errors: _Errors) -> None:
    """ValidateObjectMeta as the API server applies it to a custom resource, plus the schema's narrowing.
    (Types were checked while decoding.)"""
    meta = meta or {}
    name, generate = meta.get("name"), meta.get("generateName")
    if not name and not generate:
        errors.add("required", "metadata.name", "Required value: name or generateName is required")
    if generate:
        # A prefix: a trailing '-' is fine (the server appends 5 random characters).
        for msg in _subdomain_errors(generate[:-1] + "a" if generate.endswith("-") else generate):
            errors.add("invalid", "metadata.generateName", f"Invalid value: {_fmt(generate)}: {msg}")
        if not name:
            # The server makes the name (the prefix cut to 58 characters, then 5 random alphanumerics)
            # and checks that too: "Gen_" also fails as metadata.name.
            name = generate[:58] + "x0x0x"
    if name:
        for msg in _subdomain_errors(name):
            errors.add("invalid", "metadata.name", f"Invalid value: {_fmt(name)}: {msg}")
        limit = schema.get("properties", {}).get("name", {}).get("maxLength")
        if limit is not None and len(name) > limit:
            errors.add("toolong", "metadata.name", f"Too long: may not be more than {limit} bytes")
    namespace = meta.get("namespace")
    if namespace and _scope_of(kind) == "Namespaced":  # cluster-scoped objects: the server clears it
        if len(namespace) > 63 or not _matches(DNS_LABEL_PATTERN, namespace):
            errors.add("invalid", "metadata.namespace", f"Invalid value: {_fmt(namespace)}: {_LABEL_MSG}")
    for key, value in (meta.get("labels") or {}).items():
        for msg in _qualified_name_errors(str(key)):
            errors.add("invalid", "metadata.labels", f"Invalid value: {_fmt(key)}: {msg}")
        if len(value or "") > 63 or not _matches(LABEL_VALUE_PATTERN, value or ""):
            errors.add("invalid", "metadata.labels",
                       f"Invalid value: {_fmt(value)}: a valid label value must be an empty string or consist of "
                       "at most 63 alphanumeric characters, '-', '_' or '.', and must start and end with an "
                       "alphanumeric character")
    annotations = meta.get("annotations") or {}
    for key in annotations:
        for msg in _qualified_name_errors(str(key).lower()):
            errors.add("invalid", "metadata.annotations", f"Invalid value: {_fmt(key)}: {msg}")
    if sum(len(str(k)) + len(v or "") for k, v in annotations.items()) > _ANNOTATIONS_MAX_BYTES:
        errors.add("toolong", "metadata.annotations", f"Too long: may not be more than {_ANNOTATIONS_MAX_BYTES} bytes")
    for finalizer in meta.get("finalizers") or []:
        for msg in _qualified_name_errors(finalizer):
            errors.add("invalid", "metadata.finalizers", f"Invalid value: {_fmt(finalizer)}: {msg}")
    for ref in meta.get("ownerReferences") or []:
        # The server's paths here carry no index (metadata.ownerReferences.name).
        for field in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(field):
                errors.add("invalid", f"metadata.ownerReferences.{field}", 'Invalid value: "": must not be empty')


def _check(value: Any, schema: dict[str, Any], path: str, errors: _Errors) -> None:
    expected = schema.get("type")
    if expected and not _type_ok(value, expected):
        errors.add("type", path, f"Invalid value: \"{_json_type(value)}\": {path} in body must be of type "
                                 f"{expected}: \"{_json_type(value)}\"")
        return
    if expected == "integer" and isinstance(value, float) and not _int64(value):
        # Passed the type check (nearly integral) but is no int64: the server's format check says so.
        errors.add("invalid", path, f"Invalid value: {value!r}: must be of type integer (default format)")
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(_fmt(v) for v in schema["enum"])
        errors.add("unsupported", path, f"Unsupported value: {_fmt(value)}: supported values: {allowed}")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.add("toolong", path, f"Too long: may not be more than {schema['maxLength']} bytes")
        if len(value) < schema.get("minLength", 0):
            errors.add("invalid", path, f"Invalid value: {_fmt(value)}: {path} in body should be at least "
                                        f"{schema['minLength']} chars long")
        if "pattern" in schema and not _matches(schema["pattern"], value):
            errors.add("invalid", path, f"Invalid value: {_fmt(value)}: {path} in body should match "
                                        f"'{schema['pattern']}'")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema:
            excl = schema.get("exclusiveMinimum") is True
            if value < schema["minimum"] or (excl and value == schema["minimum"]):
                op = "greater than" if excl else "greater than or equal to"
                errors.add("invalid", path, f"Invalid value: {value}: {path} in body should be {op} {schema['minimum']}")
        if "maximum" in schema:
            excl = schema.get("exclusiveMaximum") is True
            if value > schema["maximum"] or (excl and value == schema["maximum"]):
                op = "less than" if excl else "less than or equal to"
                errors.add("invalid", path, f"Invalid value: {value}: {path} in body should be {op} {schema['maximum']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.add("toomany", path, f"Too many: {len(value)}: must have at most {schema['maxItems']} items")
        if len(value) < schema.get("minItems", 0):
            errors.add("invalid", path, f"Invalid value: {len(value)}: {path} in body should have at least "
                                        f"{schema['minItems']} items")
        for i, item in enumerate(value):
            _check(item, schema.get("items", {}), f"{path}[{i}]", errors)
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.add("toomany", path, f"Too many: {len(value)}: must have at most {schema['maxProperties']} items")
        for name in schema.get("required", []):
            if name not in value:
                errors.add("required", f"{path}.{name}", "Required value")
        props = schema.get("properties")
        if props is not None:
            for name, sub in value.items():
                if name in props:  # unknown fields were reported (and stopped everything) in step 1
                    _check(sub, props[name], f"{path}.{name}", errors)
        elif isinstance(schema.get("additionalProperties"), dict):
            for name, sub in value.items():
                _check(sub, schema["additionalProperties"], f"{path}.{name}", errors)


def _list_invariants(value: Any, schema: dict[str, Any], path: str, errors: _Errors) -> None:
    """x-kubernetes-list-type set / map: no duplicate items (or keys), as ValidateListSetsAndMaps checks."""
    if isinstance(value, list):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "set":  # each repeated value is reported once, at its first repeat
            seen: list[Any] = []
            reported: list[Any] = []
            for i, item in enumerate(value):
                if item in seen and item not in reported:
                    errors.add("duplicate", f"{path}[{i}]", f"Duplicate value: {_fmt(item)}")
                    reported.append(item)
                seen.append(item)
        elif list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen_keys: list[tuple] = []
            reported_keys: list[tuple] = []  # as for sets: each repeated key once, at its first repeat
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    key = tuple(item.get(k) for k in keys)
                    if key in seen_keys and key not in reported_keys:
                        reported_keys.append(key)
                        errors.add("duplicate", f"{path}[{i}]", f"Duplicate value: {dict(zip(keys, key))}")
                    seen_keys.append(key)
        for i, item in enumerate(value):
            _list_invariants(item, schema.get("items", {}), f"{path}[{i}]", errors)
    elif isinstance(value, dict):
        for name, sub in value.items():
            if name in schema.get("properties", {}):
                _list_invariants(sub, schema["properties"][name], f"{path}.{name}", errors)


# --- 4. CEL rules ------------------------------------------------------------------------------

#: Property names CEL reserves: a rule reads the property `namespace` as `self.__namespace__`
#: (Kubernetes' escaping; unescaped, `self.namespace` is no field at all: has() is always false and the
#: API server's cost estimate of a rule over it is unbounded, which refuses the CRD).
CEL_RESERVED = frozenset({"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
                          "function", "if", "import", "let", "loop", "package", "namespace", "return", "var",
                          "void", "while"})


def cel_property_name(name: str) -> str:
    """A declared property's name as a CEL rule spells it (apiextensions' escaping rules)."""
    if name in CEL_RESERVED:
        return f"__{name}__"
    return (name.replace("__", "__underscores__").replace(".", "__dot__").replace("-", "__dash__")
            .replace("/", "__slash__"))


def _cel_value(value: Any, schema: dict[str, Any]) -> Any:
    """The value as the API server hands it to CEL: declared properties under their escaped names
    (map keys -- additionalProperties -- stay as they are)."""
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_cel_value(v, schema["items"]) for v in value]
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        return {(cel_property_name(k) if k in props else k): _cel_value(v, props.get(k, {})) for k, v in value.items()}
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: _cel_value(v, schema["additionalProperties"]) for k, v in value.items()}
    return value


def _cel(value: Any, schema: dict[str, Any], path: str, old: Any, errors: _Errors) -> None:
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _cel(item, schema["items"], f"{path}[{i}]", None, errors)
    elif isinstance(value, dict) and "properties" in schema:
        for name, sub in value.items():
            if name in schema["properties"]:
                _cel(sub, schema["properties"][name], f"{path}.{name}",
                     old.get(name) if isinstance(old, dict) else None, errors)
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for name, sub in value.items():
            _cel(sub, schema["additionalProperties"], f"{path}.{name}", None, errors)
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue  # transition rules run on updates only
        try:
            activation = {"self": celpy.json_to_cel(_cel_value(value, schema))}
            if transition:
                activation["oldSelf"] = celpy.json_to_cel(_cel_value(old, schema))
        except ValueError:  # an integer beyond int64 inside a number field: already out of its bounds
            continue
        try:
            ok = bool(_cel_program(rule["rule"]).evaluate(activation))
        except celpy.CELEvalError as exc:  # the API server reports evaluation errors as Invalid too
            ok, rule = False, {**rule, "message": f"{rule.get('message', rule['rule'])} ({exc})"}
        if not ok:
            where = path + rule.get("fieldPath", "")
            word = {"FieldValueRequired": "Required value", "FieldValueForbidden": "Forbidden",
                    "FieldValueDuplicate": "Duplicate value"}.get(rule.get("reason", ""), "Invalid value")
            errors.add("cel", where, f"{word}: {rule.get('message', rule['rule'])}")


def validate_manifest(manifest: dict[str, Any], old: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Return the manifest with schema defaults applied, or raise ManifestError naming every bad field."""
    if not isinstance(manifest, dict):
        raise ManifestError(["manifest must be a mapping"], [""])
    if manifest.get("apiVersion") != API_VERSION:
        raise ManifestError([f"apiVersion: Unsupported value: {_fmt(manifest.get('apiVersion'))}: supported values: \"{API_VERSION}\""])
    try:
        schema = _schema_for(manifest.get("kind", ""))
    except (KeyError, TypeError):
        raise ManifestError([f"kind: Unsupported value: {_fmt(manifest.get('kind'))}: supported values: "
                             + ", ".join(_fmt(k.KIND) for k in KINDS)]) from None
    kind = manifest["kind"]
    body_schema = {name: sub for name, sub in schema["properties"].items()
                   if name not in ("apiVersion", "kind", "metadata")}

    # 1. Strict decoding: unknown fields (metadata's against ObjectMeta) and nothing else.
    unknown: list[str] = []
    for name, sub in manifest.items():
        if name == "metadata" and isinstance(sub, dict):
            unknown += [f"metadata.{k}" for k in sub if k not in _OBJECT_META_FIELDS]
        elif name in body_schema:
            _unknown_fields(sub, body_schema[name], name, unknown)
        elif name not in ("apiVersion", "kind", "metadata"):
            unknown.append(str(name))
    if unknown:
        raise ManifestError([f'{u}: unknown field "{u}"' for u in unknown], unknown)
    # metadata decodes into ObjectMeta (typed): a wrong type there fails the decoding, alone.
    undecodable = _metadata_type_errors(manifest.get("metadata"))
    if undecodable:
        raise ManifestError([f"{f}: {m}" for f, m in undecodable], [f for f, _ in undecodable])

    # 2. Nulls and defaults.
    obj = _apply_defaults(copy.deepcopy(manifest), schema)
    old_obj = _apply_defaults(copy.deepcopy(old), schema) if old else None

    # 3. Metadata and the OpenAPI schema (status is dropped on create: not checked).
    errors = _Errors()
    _check_metadata(obj.get("metadata"), kind, schema["properties"]["metadata"], errors)
    if "spec" not in obj:
        errors.add("required", "spec", "Required value")
    checked = {name: value for name, value in obj.items() if name in body_schema and name != "status"}
    for name, value in checked.items():
        _check(value, body_schema[name], name, errors)
        _list_invariants(value, body_schema[name], name, errors)

    # 4. CEL, unless a blocking error makes the rules' inputs meaningless.
    if not errors.blocking:
        for name, value in checked.items():
            _cel(value, body_schema[name], name, old_obj.get(name) if old_obj else None, errors)
    if errors:
        errors.raise_()
    return obj

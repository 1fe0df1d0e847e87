"""Generate CustomResourceDefinitions (apiextensions.k8s.io/v1) from the pydantic models.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 subset:
no $ref, no anyOf-with-null, boolean exclusiveMinimum, a type on every node. This module
does that translation and nothing else, so the models stay the single source of truth.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from .meta import GROUP, VERSION, Resource


class _WithFactoryDefaults(GenerateJsonSchema):
    """Also emit defaults that come from default_factory (pydantic skips them)."""

    def default_schema(self, schema):  # type: ignore[override]
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json", exclude_none=True)
            schema = {**schema, "default": value}
            schema.pop("default_factory")
        return super().default_schema(schema)

# JSON-schema keys Kubernetes' structural schemas accept (besides the x-kubernetes-* ones).
_KEEP = {
    "type", "description", "properties", "required", "items", "enum", "default", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "minItems", "maxItems", "minProperties", "maxProperties", "additionalProperties", "format", "nullable",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline $refs and simplify the pydantic output into a structural schema."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        target.update(node)  # field-level description / rules win over the model's
        node = target
    if "anyOf" in node:  # Optional[X] -> X (absence means unset; we never send null)
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unsupported union in API schema: {options}")
        inner = options[0]
        node = {**_resolve(inner, defs), **{k: v for k, v in node.items() if k != "default" or v is not None}}
        if node.get("default", 0) is None:
            node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string" if all(isinstance(v, str) for v in node["enum"]) else "integer"
    # JSON Schema 2020-12 exclusive bounds are numbers; OpenAPI v3.0 uses booleans.
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    if node.get("additionalProperties") is False:  # structural schemas prune unknown fields instead
        node.pop("additionalProperties")
    if node.get("additionalProperties") is True and node.get("x-kubernetes-preserve-unknown-fields"):
        # dict[str, Any]: `additionalProperties: true` is an empty schema for every value, so the API
        # server pruned the nested fields ({"bias": {"maxGap": 3}} was stored as {"bias": {}})
        # despite preserve-unknown-fields, which alone keeps them.
        node.pop("additionalProperties")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _resolve(value, defs)
        elif key in _KEEP or key.startswith("x-kubernetes-"):
            out[key] = value
    if "x-kubernetes-preserve-unknown-fields" in out:
        out.setdefault("type", "object")
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def _minimal_object_defaults(node: Any) -> Any:
    """Reduce object defaults to what nested defaults don't already give.

    `default: {}` on an object makes the API server apply the nested defaults, so
    `kubectl get -o yaml` shows every effective setting without the CRD repeating them.
    """
    if isinstance(node, dict):
        for value in node.values():
            _minimal_object_defaults(value)
        if node.get("type") == "object" and isinstance(node.get("default"), dict):
            props = node.get("properties", {})
            node["default"] = {k: v for k, v in node["default"].items()
                               if k not in props or props[k].get("default") != v}
        elif node.get("type") == "array" and node.get("default") == []:
            node.pop("default")
    elif isinstance(node, list):
        for value in node:
            _minimal_object_defaults(value)
    return node


API_VERSION_DESCRIPTION = (
    "APIVersion defines the versioned schema of this representation of an object. Servers should convert "
    "recognized schemas to the latest internal value, and may reject unrecognized values. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources")
KIND_DESCRIPTION = (
    "Kind is a string value representing the REST resource this object represents. Servers may infer this "
    "from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds")


def openapi_schema(kind: type[Resource]) -> dict[str, Any]:
    """The openAPIV3Schema of a kind."""
    raw = kind.model_json_schema(by_alias=True, mode="validation", schema_generator=_WithFactoryDefaults)
    defs = raw.pop("$defs", {})
    schema = _minimal_object_defaults(_resolve(raw, defs))
    props = schema["properties"]
    # Validated by the API server itself (a DNS-1123 subdomain of <= 253 characters); a schema may only
    # narrow metadata.name, which kinds whose name becomes a label value of their Jobs do (<= 63).
    props["metadata"] = {"type": "object"}
    if kind.NAME_MAX_LENGTH < 253:
        props["metadata"]["properties"] = {"name": {
            "type": "string", "maxLength": kind.NAME_MAX_LENGTH,
            "description": f"Name of the object: a DNS-1123 subdomain of at most {kind.NAME_MAX_LENGTH} "
                           "characters (it labels the Jobs the operator creates for it)."}}
    # The API server publishes (and `kubectl explain` shows) its standard text for these two, whatever
    # a CRD says: say the same, so what we generate is what users see.
    props["kind"] = {"type": "string", "description": KIND_DESCRIPTION}
    props["apiVersion"] = {"type": "string", "description": API_VERSION_DESCRIPTION}
    schema["required"] = ["spec"]
    schema["description"] = (kind.__doc__ or "").strip()
    return schema


def crd(kind: type[Resource]) -> dict[str, Any]:
    """The full CustomResourceDefinition of a kind."""
    plural = kind.PLURAL
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "finetune-operator"}},
        "spec": {
            "group": GROUP,
            "scope": kind.SCOPE,
            "names": {
                "kind": kind.KIND,
                "listKind": f"{kind.KIND}List",
                "plural": plural,
                "singular": kind.KIND.lower(),
                "shortNames": list(kind.SHORT_NAMES),
                "categories": ["finetune"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [dict(c) for c in kind.PRINTER_COLUMNS],
                "schema": {"openAPIV3Schema": openapi_schema(kind)},
            }],
        },
    }


def crd_filename(kind: type[Resource]) -> str:
    return f"{GROUP}_{kind.PLURAL}.yaml"

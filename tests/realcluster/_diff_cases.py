"""Manifests for the differential test: schema-fuzzed specs and schema-driven mutations of valid ones.

Everything is derandomized (hypothesis with derandomize=True, random.Random with fixed seeds), so
the same manifests go out every run and a verdict never depends on luck.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Iterator

import re2
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis_jsonschema import from_schema

from finetune_operator.api.crd import openapi_schema

REPO = Path(__file__).resolve().parent.parent.parent


def example_manifests() -> dict[str, list[dict]]:
    """Every manifest in examples/, by kind (the valid starting points of the mutations)."""
    out: dict[str, list[dict]] = {}
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.setdefault(doc["kind"], []).append(doc)
    return out


def fuzzed_specs(kind, count: int, derandomize: bool = True) -> list[dict]:
    """Specs hypothesis-jsonschema draws from the kind's spec schema (CEL rules are not in the JSON
    schema, so some of these break one: valid and invalid-ish both)."""
    from test_api_fuzz import _to_json_schema  # tests/ is on sys.path

    spec_schema = {"$schema": "http://json-schema.org/draft-04/schema#",
                   **_to_json_schema(openapi_schema(kind)["properties"]["spec"])}
    drawn: list[dict] = []

    @settings(max_examples=count, deadline=None, suppress_health_check=list(HealthCheck), derandomize=derandomize,
              database=None)
    @given(from_schema(spec_schema))
    def draw(spec):
        drawn.append(spec)

    draw()
    return drawn


def _nodes(value: Any, schema: dict, path: tuple) -> Iterator[tuple[tuple, Any, dict]]:
    """(path, value, schema) of every node present in value."""
    yield path, value, schema
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in value.items():
            if name in schema["properties"]:
                yield from _nodes(sub, schema["properties"][name], path + (name,))
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for name, sub in value.items():
            yield from _nodes(sub, schema["additionalProperties"], path + (name,))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _nodes(item, schema["items"], path + (i,))


def _minimal(schema: dict) -> Any:
    """A small value the schema accepts (for adding an absent optional field before mutating it)."""
    if "default" in schema:
        return copy.deepcopy(schema["default"])
    if "enum" in schema:
        return schema["enum"][0]
    t = schema.get("type")
    if t == "object":
        return {name: _minimal(schema["properties"][name]) for name in schema.get("required", [])}
    if t == "array":
        return [_minimal(schema["items"])] * max(1, schema.get("minItems", 0)) if "items" in schema else []
    if t == "integer":
        return max(int(schema.get("minimum", 1)) + (1 if schema.get("exclusiveMinimum") else 0), 1)
    if t == "number":
        return 0.5 if schema.get("minimum", 0) <= 0.5 <= schema.get("maximum", 1) else schema["minimum"] + 1
    if t == "boolean":
        return True
    for candidate in _GOOD_STRINGS:
        if re2.search(schema.get("pattern", ""), candidate) and len(candidate) <= schema.get("maxLength", 10**6):
            return candidate
    return "a"


#: Strings that satisfy one of the API's patterns each (URIs, digests, names, quantities, resources).
_GOOD_STRINGS = ("a", "s3://bucket/key", "sha256:" + "0" * 64, "example.com/gpu", "1", "1Gi")


def _bad_values(value: Any, schema: dict, rng: random.Random) -> list[Any]:
    """Values that break the node's schema in one way each: wrong type, bounds, patterns, enums, null."""
    t = schema.get("type")
    wrong_type = {"string": 12345, "integer": "12", "number": "1.5", "boolean": "true",
                  "object": "not-an-object", "array": {"not": "a list"}}
    bad: list[Any] = [wrong_type.get(t, 1), None]
    if t == "integer":
        bad.append(2.5)
        bad.append(16.000000001)  # nearly integral: passes the type check, fails the int64 format check
        bad.append(2**63)  # beyond int64
    if "enum" in schema:
        bad.append("NotAValue")
    if "pattern" in schema:
        bad += ["Not Valid!", " " + str(value) if isinstance(value, str) else "x y", "UPPER_case"]
    if "maxLength" in schema:
        bad.append("a" * (schema["maxLength"] + 1))
    if schema.get("minLength"):
        bad.append("")
    for bound, step in (("minimum", -1), ("maximum", 1)):
        if bound in schema:
            edge = schema[bound]
            bad.append(edge if schema.get("exclusive" + bound[0].upper() + bound[1:]) else edge + step)
            bad.append(edge + step * rng.choice([0.5, 10, 1000]))
    if t == "array":
        item = value[0] if isinstance(value, list) and value else _minimal(schema.get("items", {}))
        if "maxItems" in schema:
            bad.append([copy.deepcopy(item) for _ in range(schema["maxItems"] + 1)])
        if schema.get("minItems"):
            bad.append([])
        if schema.get("x-kubernetes-list-type") == "set":
            bad.append([item, item])
        bad.append([None])
    if t == "object" and isinstance(value, dict):
        bad.append({**value, "bogusField": 1})
        for name in schema.get("required", []):
            bad.append({k: v for k, v in value.items() if k != name})
        if "maxProperties" in schema:
            bad.append({f"k{i}": "v" for i in range(schema["maxProperties"] + 1)})
        if isinstance(schema.get("additionalProperties"), dict):
            bad.append({"bad key!": "v"})
            bad.append({"example.com/ok": "bad value!"})
    return bad


def _set(root: Any, path: tuple, new: Any) -> Any:
    root = copy.deepcopy(root)
    node = root
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = new
    return root


def _with_optional_fields(spec: dict, schema: dict, rng: random.Random) -> dict:
    """The spec with a few absent optional fields filled in (so their checks get mutated too)."""
    spec = copy.deepcopy(spec)
    for path, value, node in list(_nodes(spec, schema, ())):
        if isinstance(value, dict) and "properties" in node:
            for name, sub in node["properties"].items():
                if name not in value and rng.random() < 0.3:
                    value[name] = _minimal(sub)
    return spec


def mutations(spec: dict, schema: dict, count: int, seed: int) -> list[dict]:
    """`count` specs, each `spec` with one node replaced by a value that breaks that node's schema."""
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < count:
        base = _with_optional_fields(spec, schema, rng)
        nodes = [n for n in _nodes(base, schema, ()) if n[0]]
        path, value, node = rng.choice(nodes)
        out.append(_set(base, path, rng.choice(_bad_values(value, node, rng))))
    return out


#: Cross-field (CEL) rule breaks and pass-through values the Job would refuse, as spec patches.
CEL_CASES: dict[str, list[dict]] = {
    "FineTuneJob": [
        {"method": "qlora"},
        {"method": "lora", "quantization": {}},
        {"training": {"epochs": 1, "maxSteps": 10}},
        {"resources": {"nodes": 2, "gpusPerNode": 0}},
        {"resources": {"tolerations": [{"operator": "Equal", "value": "x"}]}},
        {"resources": {"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]}},
        {"resources": {"tolerations": [{"key": "a", "effect": "NoSchedule", "tolerationSeconds": 3}]}},
        {"resources": {"tolerations": [{"key": "a/b/c"}]}},
        {"resources": {"tolerations": [{"key": "x" * 254 + "/a"}]}},
        {"resources": {"gpuResourceName": "kubernetes.io/gpu"}},
        {"resources": {"gpuResourceName": "gpu"}},
        {"resources": {"gpuResourceName": "x" * 245 + "/gpu"}},
        {"resources": {"priorityClassName": "High_Priority"}},
        {"resources": {"gpuNodeSelector": {"-bad": "v"}}},
        {"resources": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Exists", "values": ["a"]}]}]}}}}},
        {"resources": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["x"]}]}]}}}}},
        {"resources": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "", "labelSelector": {"matchLabels": {"app": "trainer"}}}]}}}},
        {"resources": {"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 0, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}}},
        {"resources": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "zone", "labelSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]}}}},
        {"image": "trainer image:1"},
        {"image": "trainer:1\n"},
    ],
    "Dataset": [
        {"evaluation": {"fraction": 0.1, "uri": "s3://bucket/eval.jsonl"}},
        {"evaluation": {"seed": 1}},
    ],
    "GovernancePolicy": [
        {"required": ["bias", "bias"]},
        {"namespaces": ["a", "a"]},
    ],
    "SyntheticDataset": [
        {"generator": {"fineTuneJob": "gen", "baseModel": {"uri": "s3://models/x"}}},
        {"generator": {"baseModel": {"uri": "s3://models/x"}}},
        {"review": {"fraction": 0}},
        {"judge": {}},
    ],
    # The participant rules read `namespace`, a CEL keyword (escaped __namespace__ by the server).
    "FederatedFineTuneJob": [
        {"participants": [{"name": "a", "namespace": "ns-a", "dataset": "d"},
                          {"name": "a", "namespace": "ns-b", "dataset": "d"}]},
        {"participants": [{"name": "a", "namespace": "ns-a", "dataset": "d"},
                          {"name": "b", "namespace": "ns-a", "dataset": "d"}]},
        {"participants": [{"name": "a", "namespace": "ns-a", "dataset": "d"},
                          {"name": "b", "namespace": "ns-a", "dataset": "e"}]},
        {"participants": [{"name": "a", "namespace": "ns-a", "dataset": "d"}, {"name": "b"}]},
        {"participants": [{"name": "a", "namespace": "ns-a", "dataset": "d"},
                          {"name": "b", "namespace": "ns-b", "dataset": "d", "remote": {"credentialsSecret": "k"}}]},
        {"participants": [{"name": "a", "namespace": "ns-a", "dataset": "d"},
                          {"name": "b", "remote": {"credentialsSecret": "k"}}]},
        {"minSites": 9},
        {"training": {"epochs": 1}},
    ],
}

#: metadata variants: (metadata, what it tests). The namespace is left to the request.
METADATA_CASES: list = [
    {"name": "UpperCase"},
    {"name": "a" * 64},
    {"name": "a" * 254},
    {"name": "dots.are.fine"},
    {"name": "-leading-dash"},
    {"name": "trailing.dot."},
    {},
    {"generateName": "gen-"},
    {"generateName": "Gen_"},
    {"name": "ok", "labels": {"app.kubernetes.io/name": "x", "bad key!": "v"}},
    {"name": "ok", "labels": {"team": "has space"}},
    {"name": "ok", "labels": {"team": "a" * 64}},
    {"name": "ok", "annotations": {"example.com/note": "anything at all: spaces, ünïcode"}},
    {"name": "ok", "annotations": {"not a key": "x"}},
    {"name": "ok", "unknownMeta": 1},
    {"name": "ok", "labels": {"a": 1}},
    {"name": "ok", "labels": ["a"]},
    {"name": 5},
    "not-an-object",
    {"name": "ok", "finalizers": ["finetune.dev/cleanup", "a b"]},
    {"name": "ok", "finalizers": ["plain"]},
    {"name": "ok", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap"}]},
    {"name": "ok", "annotations": {"a": "x" * 300000}},
]

"""Fuzz: every spec the generated CRD schema accepts, the pydantic models accept too (no drift).

The examples are derandomized (the same every run) so the suite's verdict does not depend on luck;
`FUZZ_RANDOM=1` explores new ones (with more examples), which is how the int64 cases were found.
"""

from __future__ import annotations

import copy
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis_jsonschema import from_schema

from finetune_operator.api import KINDS
from finetune_operator.api.crd import openapi_schema
from finetune_operator.api.validation import ManifestError, validate_manifest


def _to_json_schema(node):
    """OpenAPI v3.0 (what CRDs use) -> JSON Schema draft 4, closed objects like kubectl --validate=strict."""
    node = copy.deepcopy(node)
    node.pop("default", None)
    node.pop("x-kubernetes-validations", None)
    if node.pop("x-kubernetes-preserve-unknown-fields", False):
        return {"type": "object", "maxProperties": 0}
    for key in ("x-kubernetes-list-type", "x-kubernetes-list-map-keys", "description", "format"):
        node.pop(key, None)
    if "properties" in node:
        node["properties"] = {k: _to_json_schema(v) for k, v in node["properties"].items()}
        node["additionalProperties"] = False
    elif isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _to_json_schema(node["additionalProperties"])
        node["maxProperties"] = 3
    if "items" in node:
        node["items"] = _to_json_schema(node["items"])
        node.setdefault("maxItems", 3)
    if node.get("type") == "string" and "pattern" not in node and "enum" not in node:
        node.setdefault("maxLength", 12)
    return node


def _valid_participants(spec: dict) -> dict:
    """FederatedFineTuneJob: random participants almost never satisfy the list's CEL rules (unique names,
    namespace+dataset xor remote), so every drawn spec would be refused; give it a valid list (and a
    minSites that fits) and fuzz the rest. The list rules have their own tests (tests/federated/)."""
    spec = dict(spec, participants=[{"name": "a", "namespace": "ns-a", "dataset": "d"},
                                    {"name": "b", "remote": {"credentialsSecret": "b-key"}}])
    if spec.get("minSites", 0) > 2:
        spec["minSites"] = 2
    # A remote participant needs the remote port's certificate and address (their own rule's tests are in
    # tests/federated/); drawn values of the other superlink fields stay.
    superlink = spec.get("superlink") if isinstance(spec.get("superlink"), dict) else {}
    spec["superlink"] = {**superlink, "tls": {"secretName": "f-tls"}, "externalAddress": "fed.example.org:443"}
    return spec


def _one_generator(spec: dict) -> dict:
    """SyntheticDataset: the generator is a FineTuneJob or a base model, exactly one (a CEL rule); a drawn
    spec sets both or neither about half the time. Keep the fineTuneJob when both are drawn."""
    generator = dict(spec.get("generator") or {})
    if "fineTuneJob" in generator:
        generator.pop("baseModel", None)
    elif "baseModel" not in generator:
        generator["fineTuneJob"] = "seed-job"
    return dict(spec, generator=generator)


#: Per kind: a repair of the drawn spec, for cross-field rules a JSON-schema fuzzer cannot satisfy.
REPAIR = {"FederatedFineTuneJob": _valid_participants, "SyntheticDataset": _one_generator}
RANDOM = os.environ.get("FUZZ_RANDOM") == "1"
EXAMPLES = 200 if RANDOM else 40


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_schema_and_models_agree(kind):
    spec_schema = {"$schema": "http://json-schema.org/draft-04/schema#",
                   **_to_json_schema(openapi_schema(kind)["properties"]["spec"])}
    accepted = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=not RANDOM)
    @given(from_schema(spec_schema))
    def check(spec):
        spec = REPAIR.get(kind.KIND, lambda s: s)(spec)
        manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": kind.KIND,
                    "metadata": {"name": "fuzz"}, "spec": spec}
        try:
            defaulted = validate_manifest(manifest)
        except ManifestError:
            return  # a CEL rule rejected it: the server would too
        kind.model_validate(defaulted)
        accepted.append(spec)

    check()
    assert len(accepted) >= 5, "the fuzzer produced almost nothing the schema accepts"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_hostile_specs_get_an_error_naming_a_field_never_a_traceback(kind):
    """One-field mutations of the examples (wrong types, bounds, patterns, enums, nulls, unknown and missing
    fields, too many items): validate_manifest answers each with a verdict, and a rejection names fields.
    (tests/realcluster/test_validation_differential.py sends the same kind of manifests to a real API server.)"""
    from realcluster._diff_cases import example_manifests, mutations

    spec_schema = openapi_schema(kind)["properties"]["spec"]
    rejected = 0
    for i, example in enumerate(example_manifests()[kind.KIND]):
        for spec in mutations(example["spec"], spec_schema, 150, seed=i):
            manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": kind.KIND, "metadata": {"name": "m"},
                        "spec": spec}
            try:
                validate_manifest(manifest)
            except ManifestError as exc:
                rejected += 1
                assert exc.fields and all(f.startswith("spec") for f in exc.fields), exc.errors
                assert all(err.startswith(f) for err, f in zip(exc.errors, exc.fields))
    assert rejected >= 100

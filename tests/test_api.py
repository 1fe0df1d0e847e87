"""The v1alpha1 API: generated CRDs stay in sync, are structural, and accept/reject the right manifests."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import celpy
import pytest
import yaml

from finetune_operator.api import KINDS, FineTuneJob
from finetune_operator.api.crd import crd, openapi_schema
from finetune_operator.api.validation import ManifestError, validate_manifest

REPO = Path(__file__).resolve().parent.parent
INVALID = sorted((REPO / "tests" / "manifests" / "invalid").glob("*.yaml"))
EXAMPLES = sorted(p for p in (REPO / "examples").rglob("*.yaml")
                  if p.parent.name != "flux")  # Flux Kustomizations: tests/test_kstatus.py checks them


def _load_gen():
    spec = importlib.util.spec_from_file_location("gen_crds", REPO / "hack" / "gen-crds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_files_are_current():
    """crds/ and docs/api.md are exactly what the models generate (run hack/gen-crds.py)."""
    for path, text in _load_gen().expected_files().items():
        assert path.exists(), f"{path} missing: run python hack/gen-crds.py"
        assert path.read_text() == text, f"{path.relative_to(REPO)} drifted from the models: run python hack/gen-crds.py"


def _walk(node, path="$"):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_schema_is_structural_and_documented(kind):
    schema = openapi_schema(kind)
    for path, node in _walk(schema):
        assert "type" in node, f"{path}: structural schemas need a type on every node"
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "not", "const", "title", "$defs"):
            assert forbidden not in node, f"{path}: {forbidden} is not allowed in a structural schema"
        if node["type"] != "object" or "properties" not in node:
            continue
        for name, sub in node["properties"].items():
            if path == "$" and name in ("metadata",):
                continue
            assert sub.get("description"), f"{path}.{name} has no description (kubectl explain would be empty)"
        for req in node.get("required", []):
            assert req in node["properties"], f"{path}: required {req} is not a property"
        if "default" in node:
            validate_default = node["default"]
            assert isinstance(validate_default, dict), f"{path}: object default must be an object"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_crd_shape(kind):
    doc = crd(kind)
    spec = doc["spec"]
    assert doc["metadata"]["name"] == f"{kind.PLURAL}.finetune.dev"
    assert spec["scope"] == kind.SCOPE
    assert "finetune" in spec["names"]["categories"]
    assert spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    columns = version["additionalPrinterColumns"]
    assert columns[-1]["name"] == "Age"
    for col in columns:  # every printer column points at a field that exists
        node = schema
        if col["jsonPath"].startswith(".metadata"):
            continue
        for part in col["jsonPath"].strip(".").split("."):
            node = node["properties"][part]


def test_finetunejob_printer_columns():
    names = [c["name"] for c in crd(FineTuneJob)["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert names[:3] == ["Phase", "Progress", "Base Model"]
    assert "Promotion" in names and "Adapter" in names


def test_every_cel_rule_compiles():
    env = celpy.Environment()
    count = 0
    for kind in KINDS:
        for path, node in _walk(openapi_schema(kind)):
            for rule in node.get("x-kubernetes-validations", []):
                env.program(env.compile(rule["rule"]))
                assert rule.get("message"), f"{path}: CEL rule without a message"
                count += 1
    assert count >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_examples_are_valid(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        defaulted = validate_manifest(doc)
        model = {k.KIND: k for k in KINDS}[doc["kind"]]
        model.model_validate(defaulted)  # the models agree with the schema on valid input


def test_there_are_at_least_15_kinds_of_mistake():
    assert len(INVALID) >= 15


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_rejected_naming_the_field(path):
    text = path.read_text()
    expected_field = text.splitlines()[0].removeprefix("# expect:").strip()
    with pytest.raises(ManifestError) as info:
        validate_manifest(yaml.safe_load(text))
    assert any(err.startswith(expected_field) or f'"{expected_field}' in err for err in info.value.errors), (
        f"no error names {expected_field}: {info.value.errors}")


def _job(**spec):
    base = {"baseModel": {"uri": "s3://models/m"}, "datasetRef": {"name": "d"}, "output": {"uri": "s3://out/x"}}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
            "spec": {**base, **spec}}


def test_cel_rules_behave():
    validate_manifest(_job(method="qlora", quantization={"quantType": "fp4"}))
    validate_manifest(_job(method="dora", quantization={}))  # QDoRA is supported by peft
    validate_manifest(_job(method="dora"))
    with pytest.raises(ManifestError, match="spec.quantization"):
        validate_manifest(_job(method="qlora"))
    with pytest.raises(ManifestError, match="spec.training"):
        validate_manifest(_job(training={"epochs": 1, "maxSteps": 3}))


def test_base_model_and_dataset_ref_are_immutable():
    old = validate_manifest(_job())
    validate_manifest(_job(training={"maxSteps": 5}), old=old)  # other fields may change
    with pytest.raises(ManifestError, match="spec.baseModel is immutable"):
        validate_manifest(_job(baseModel={"uri": "s3://models/other"}), old=old)
    with pytest.raises(ManifestError, match="spec.datasetRef is immutable"):
        validate_manifest(_job(datasetRef={"name": "other"}), old=old)


def test_defaults_are_applied_like_the_api_server():
    obj = validate_manifest(_job())
    assert obj["spec"]["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]}
    assert obj["spec"]["training"]["packing"] is True
    assert obj["spec"]["promotion"]["mode"] == "auto"
    parsed = FineTuneJob.model_validate(obj)
    assert parsed.spec.lora.r == 16


def test_import_operator_still_gives_the_standard_library():
    out = subprocess.run([sys.executable, "-c", "import operator; print(operator.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert "site-packages" not in out and not out.startswith(str(REPO)), out
    assert out.endswith("operator.py")


# --- the API server's ways, as validation.py mirrors them (each was seen on a real v1.36 API server;
# tests/realcluster/test_validation_differential.py holds the two together) ---------------------

def _fields(manifest, old=None) -> list[str]:
    with pytest.raises(ManifestError) as info:
        validate_manifest(manifest, old=old)
    return info.value.fields


def test_unknown_fields_are_the_only_errors_reported():
    """Strict decoding fails before any other check: a bad enum next to a typo is not reported."""
    assert _fields(_job(method="full", lora={"rank": 8})) == ["spec.lora.rank"]
    # An object where a list belongs has only unknown keys (the pruning walk), not a type error.
    assert _fields(_job(governance={"required": {"not": "a list"}})) == ["spec.governance.required.not"]
    assert _fields({**_job(), "metadata": {"name": "j", "labelz": {}}}) == ["metadata.labelz"]


def test_nulls_are_pruned_before_defaulting_but_not_in_lists():
    obj = validate_manifest(_job(lora=None, resources={"gpuNodeSelector": {"pool": None}}))
    assert obj["spec"]["lora"]["r"] == 16 and obj["spec"]["resources"]["gpuNodeSelector"] == {}
    assert _fields(_job(lora={"targetModules": [None]})) == ["spec.lora.targetModules[0]"]


def test_cel_rules_are_skipped_after_a_blocking_error_only():
    both = {"method": "qlora"}  # the qlora rule fails too
    assert _fields(_job(**both, promotion={"mode": "x"})) == ["spec.promotion.mode"]  # enum: blocking
    assert sorted(_fields(_job(**both, baseModel={"uri": "bad"}))) == ["spec.baseModel.uri", "spec.quantization"]


def test_integers_as_the_api_server_reads_them():
    assert validate_manifest(_job(lora={"r": 8.0}))["spec"]["lora"]["r"] == 8  # an int64 to the server
    assert _fields(_job(lora={"r": 8.5})) == ["spec.lora.r"]
    # Nearly integral passes the type check (go-openapi's 1e-9 relative error) but not the int64 check.
    assert _fields(_job(training={"seed": 16.000000001})) == ["spec.training.seed"]
    assert _fields(_job(training={"maxSteps": 2**63})) == ["spec.training.maxSteps"]


def test_a_repeated_set_value_is_reported_once():
    policy = {"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy", "metadata": {"name": "p"},
              "spec": {"required": ["pii", "pii", "pii", "bias", "bias"]}}
    assert _fields(policy) == ["spec.required[1]", "spec.required[4]"]


def test_patterns_have_go_regexp_semantics():
    """RE2, like the API server: `$` is the end of the text, `\\s` only ASCII whitespace."""
    assert _fields(_job(image="trainer:1\n")) == ["spec.image"]
    validate_manifest(_job(image="trainer:1\u2003"))  # U+2003 is not whitespace to Go's \S


def test_metadata_rules_of_custom_resources():
    def meta(**m):
        return {**_job(), "metadata": m}

    assert _fields(meta(name="Upper")) == ["metadata.name"]
    assert _fields(meta(name="a" * 64)) == ["metadata.name"]  # FineTuneJob names label their Jobs: <= 63
    validate_manifest(meta(name="a" * 63))
    validate_manifest(meta(name="dots.are.fine"))
    validate_manifest(meta(generateName="job-"))
    # The server makes a name from the prefix and checks it too.
    assert sorted(_fields(meta(generateName="Job_"))) == ["metadata.generateName", "metadata.name"]
    assert _fields(meta()) == ["metadata.name"]
    assert _fields(meta(name="j", namespace="Team_A")) == ["metadata.namespace"]
    assert _fields(meta(name="j", labels={"app": "has space"})) == ["metadata.labels"]
    assert _fields(meta(name="j", annotations={"not a key": "x"})) == ["metadata.annotations"]
    policy = {"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy",
              "metadata": {"name": "p" * 253, "namespace": "ignored-for-cluster-scope"}, "spec": {}}
    validate_manifest(policy)  # cluster-scoped: 253 characters, and the namespace is cleared, not checked


def test_status_is_ignored_on_create_except_unknown_fields():
    validate_manifest({**_job(), "status": {"phase": "NotAPhase"}})
    assert _fields({**_job(), "status": {"nope": 1}}) == ["status.nope"]


def test_pass_through_scheduling_fields_are_checked():
    res = lambda **r: _job(resources=r)  # noqa: E731
    assert _fields(res(tolerations=[{"key": "a", "operator": "Exists", "value": "x"}])) == [
        "spec.resources.tolerations[0].value"]
    assert _fields(res(tolerations=[{"key": "a", "tolerationSeconds": 5}])) == ["spec.resources.tolerations[0].effect"]
    assert _fields(res(tolerations=[{"value": "x"}])) == ["spec.resources.tolerations[0].operator"]
    assert _fields(res(tolerations=[{"key": "p" * 254 + "/a", "operator": "Exists"}])) == [
        "spec.resources.tolerations[0].key"]
    assert _fields(res(priorityClassName="High")) == ["spec.resources.priorityClassName"]
    assert _fields(res(gpuResourceName="kubernetes.io/gpu")) == ["spec.resources.gpuResourceName"]
    assert _fields(res(gpuNodeSelector={"a b": "c"})) == ["spec.resources.gpuNodeSelector"]
    assert _fields(res(affinity={"nodeAffinity": {"x": 1}})) == ["spec.resources.affinity.nodeAffinity.x"]
    term = {"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["3", "4"]}]}
    assert _fields(res(affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [term]}}})) == [
        "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
        ".matchExpressions[0].values"]
    ok = validate_manifest(res(gpuResourceName="amd.com/gpu", priorityClassName="ml.high", tolerations=[
        {"operator": "Exists"}, {"key": "sku", "value": "gpu", "effect": "NoExecute", "tolerationSeconds": 60}]))
    assert ok["spec"]["resources"]["tolerations"][1]["operator"] == "Equal"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_every_default_validates_against_its_own_schema(kind):
    """The API server refuses a CRD whose defaults break their schema or its CEL rules (it checks the
    default before any nested default applies); the same check here, without a cluster."""
    from finetune_operator.api import validation

    count = 0
    for path, node in _walk(openapi_schema(kind)):
        if "default" not in node:
            continue
        errors = validation._Errors()
        # As the server does: the default as written, nested defaults not applied (default: {} of
        # spec.resources once failed its rule this way).
        validation._check(copy.deepcopy(node["default"]), node, path, errors)
        validation._cel(copy.deepcopy(node["default"]), node, path, None, errors)
        assert not errors, f"{path}: default {node['default']!r} is invalid: {errors.items}"
        count += 1
    assert count >= {"Dataset": 15, "FineTuneJob": 50, "GovernancePolicy": 15, "SyntheticDataset": 30,
                     "FederatedFineTuneJob": 40}[kind.KIND]


def test_metadata_of_the_wrong_type_fails_alone_like_decoding():
    assert _fields({**_job(method="x"), "metadata": {"name": 5}}) == ["metadata.name"]
    assert _fields({**_job(), "metadata": "j"}) == ["metadata"]
    assert _fields({**_job(), "metadata": {"name": "j", "labels": {"a": 1}}}) == ["metadata.labels"]
    assert _fields({**_job(), "metadata": {"name": "j", "finalizers": ["a b"]}}) == ["metadata.finalizers"]


def test_cel_reads_reserved_property_names_escaped_as_the_api_server_does():
    """`namespace` is a CEL keyword: the API server hands the property to rules as __namespace__. A rule
    that says self.namespace reads nothing (has() is false) and the server refuses its cost estimate;
    our port escapes the same way, so a valid participant passes and a duplicated Dataset does not."""
    from finetune_operator.api.validation import cel_property_name

    assert [cel_property_name(n) for n in ("namespace", "a.b", "x-y", "p/q", "a__b", "name")] == [
        "__namespace__", "a__dot__b", "x__dash__y", "p__slash__q", "a__underscores__b", "name"]
    base = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FederatedFineTuneJob", "metadata": {"name": "f"},
            "spec": {"baseModel": {"uri": "s3://models/x"}, "output": {"uri": "s3://out-b/x"},
                     "superlink": {"externalAddress": "fed.example.org:443", "tls": {"secretName": "f-tls"}}}}
    good = [{"name": "a", "namespace": "ns-a", "dataset": "d"}, {"name": "b", "namespace": "ns-b", "dataset": "d"},
            {"name": "c", "remote": {"credentialsSecret": "c-key"}}]
    validate_manifest({**base, "spec": {**base["spec"], "participants": good}})
    twice = good[:2] + [{"name": "c", "namespace": "ns-a", "dataset": "d"}]
    with pytest.raises(ManifestError, match="can be one participant only"):
        validate_manifest({**base, "spec": {**base["spec"], "participants": twice}})
    with pytest.raises(ManifestError, match="either namespace and dataset"):
        validate_manifest({**base, "spec": {**base["spec"], "participants": good[:1] + [{"name": "z"}]}})

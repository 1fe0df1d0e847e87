"""Our CRDs on a real Kubernetes v1.36 API server: they install (crds/ and the chart's copies), every
default validates and is applied, `kubectl explain` shows every description we generate, printer
columns show, the examples are accepted, every manifest in tests/manifests/invalid/ is rejected by
the server naming the field (and by api/validation.py), and a Job the operator builds from an
accepted FineTuneJob with every pass-through scheduling field set is accepted too.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from finetune_operator import children
from finetune_operator.api import KINDS, Dataset, FineTuneJob, GovernancePolicy
from finetune_operator.api.crd import crd, openapi_schema
from finetune_operator.api.validation import ManifestError, validate_manifest
from finetune_operator.config import OperatorConfig

REPO = Path(__file__).resolve().parent.parent.parent
CHART_CRDS = REPO / "helm" / "finetune-operator" / "crds"
INVALID = sorted((REPO / "tests" / "manifests" / "invalid").glob("*.yaml"))
# Our kinds' examples; the Flux Kustomizations (examples/flux/) are Flux's kinds, whose CRDs this
# cluster does not have: tests/test_kstatus.py and tests/realcluster/test_gitops_status.py check them.
EXAMPLES = sorted(p for p in (REPO / "examples").rglob("*.yaml") if p.parent.name != "flux")


def _expected_field(path: Path) -> str:
    return path.read_text().splitlines()[0].removeprefix("# expect:").strip()


# --- install ----------------------------------------------------------------------------------

def test_crds_from_crds_dir_are_established_with_our_schema(real_cluster, crds):
    for kind in KINDS:
        name = f"{kind.PLURAL}.finetune.dev"
        assert name in crds
        served = real_cluster.get("crd", name)
        conditions = {c["type"]: c["status"] for c in served["status"]["conditions"]}
        assert conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True"
        (version,) = served["spec"]["versions"]
        # What the server stores is what we generate: nothing was dropped or rewritten on the way.
        assert version["schema"]["openAPIV3Schema"] == openapi_schema(kind)
        assert version["additionalPrinterColumns"] == crd(kind)["spec"]["versions"][0]["additionalPrinterColumns"]


def test_chart_crds_are_accepted_and_established(real_cluster, crds):
    """helm/finetune-operator/crds/ (our copies plus Kopf's peering CRDs), as `helm install` sends them."""
    names = [doc["metadata"]["name"] for path in sorted(CHART_CRDS.glob("*.yaml"))
             for doc in yaml.safe_load_all(path.read_text()) if doc]
    real_cluster.apply(CHART_CRDS)
    real_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names])
    assert {f"{k.PLURAL}.finetune.dev" for k in KINDS} <= set(names)
    assert any(n.endswith("kopf.dev") for n in names)
    for name in names:
        served = real_cluster.get("crd", name)
        assert any(c["type"] == "Established" and c["status"] == "True" for c in served["status"]["conditions"])


# --- defaults ---------------------------------------------------------------------------------

def _fill_optional_objects(schema: dict) -> dict:
    """An object with every optional, default-less object field set to {} (recursively), so that the
    defaults below them apply too; fields with a default are left out, to be defaulted."""
    out = {}
    for name, sub in schema.get("properties", {}).items():
        if "default" in sub or sub.get("type") != "object" or "properties" not in sub or sub.get("required"):
            continue
        out[name] = _fill_optional_objects(sub)
    return out


def _check_defaults(obj, sent, schema: dict, path: str, seen: list[str]) -> None:
    """Every default of the schema below a present object is in `obj` (what the server stored), with the
    default's value, unless the field was `sent`."""
    if not isinstance(obj, dict):
        return
    sent = sent if isinstance(sent, dict) else {}
    for name, sub in schema.get("properties", {}).items():
        where = f"{path}.{name}"
        if "default" in sub and name not in sent:
            assert name in obj, f"{where}: the default {sub['default']!r} was not applied"
            if not isinstance(sub["default"], dict):
                assert obj[name] == sub["default"], f"{where}: {obj[name]!r} != default {sub['default']!r}"
            else:
                for key, value in sub["default"].items():
                    assert obj[name].get(key) == value, f"{where}.{key}: default {value!r} not applied"
            seen.append(where)
        if name in obj and sub.get("type") == "object":
            _check_defaults(obj[name], sent.get(name), sub, where, seen)


REQUIRED = {
    "Dataset": {"source": {"uri": "s3://data/x.jsonl"}, "format": "chat", "provenance": {"origin": "tests"}},
    # dora: the only method that allows an empty quantization {} (QDoRA) without further settings.
    "FineTuneJob": {"baseModel": {"uri": "s3://models/m"}, "datasetRef": {"name": "d"},
                    "output": {"uri": "s3://out/x"}, "method": "dora"},
    "GovernancePolicy": {},
    "SyntheticDataset": {"seed": {"dataset": "seed"}, "generator": {"fineTuneJob": "gen"}, "examples": 10},
    "FederatedFineTuneJob": {"baseModel": {"uri": "s3://models/m"}, "output": {"uri": "s3://out/x"},
                             "participants": [{"name": "a", "namespace": "ns-a", "dataset": "d"},
                                              {"name": "b", "namespace": "ns-b", "dataset": "d"}]},
}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_every_default_is_applied_by_the_server(real_cluster, crds, namespace, kind):
    schema = openapi_schema(kind)
    spec = {**_fill_optional_objects(schema["properties"]["spec"]), **REQUIRED[kind.KIND]}
    if kind.KIND == "FineTuneJob":
        # Some optional objects only make sense with a required field inside; leave out the ones that
        # need one (affinity terms, approval) and keep those with defaults below them.
        spec["resources"] = {"tolerations": [{"operator": "Exists"}]}
        spec.pop("initFrom")  # exactly one of fineTuneJob, alias, adapter: an empty one is invalid
    if kind.KIND == "SyntheticDataset":
        spec["generator"] = REQUIRED[kind.KIND]["generator"]  # exactly one of fineTuneJob, baseModel
        spec.get("filters", {}).pop("judge", None)  # needs its rubric
    if kind.KIND == "FederatedFineTuneJob":
        for drop in ("quantization", "initFrom"):
            spec.pop(drop, None)
    name = f"defaults-{kind.KIND.lower()}-{namespace}"[-kind.NAME_MAX_LENGTH:].lstrip("-")
    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": kind.KIND, "metadata": {"name": name}, "spec": spec}
    args = ("-n", namespace) if kind.SCOPE == "Namespaced" else ()
    real_cluster.kubectl("create", *args, "-f", "-", input=json.dumps(manifest))
    try:
        stored = real_cluster.get(kind.PLURAL, name, namespace if kind.SCOPE == "Namespaced" else None)
    except Exception:
        if kind.SCOPE == "Cluster":
            real_cluster.kubectl("delete", kind.PLURAL, name, "--wait=false")
        raise
    seen: list[str] = []
    _check_defaults(stored["spec"], spec, schema["properties"]["spec"], "spec", seen)
    assert len(seen) >= {"Dataset": 8, "FineTuneJob": 40, "GovernancePolicy": 10, "SyntheticDataset": 20,
                         "FederatedFineTuneJob": 30}[kind.KIND], seen
    # And validation.py defaults the same way.
    assert validate_manifest(manifest)["spec"] == stored["spec"]

    # The status' defaults apply to what the operator writes through the status subresource.
    status = _fill_optional_objects(schema["properties"]["status"])
    args = ("-n", namespace) if kind.SCOPE == "Namespaced" else ()
    try:
        real_cluster.kubectl("patch", kind.PLURAL, name, *args, "--subresource=status", "--type=merge",
                             "-p", json.dumps({"status": status}))
        stored = real_cluster.get(kind.PLURAL, name, namespace if kind.SCOPE == "Namespaced" else None)
    finally:
        if kind.SCOPE == "Cluster":
            real_cluster.kubectl("delete", kind.PLURAL, name, "--wait=false")
    status_seen: list[str] = []
    _check_defaults(stored["status"], status, schema["properties"]["status"], "status", status_seen)
    assert len(status_seen) >= {"Dataset": 8, "FineTuneJob": 10, "GovernancePolicy": 1, "SyntheticDataset": 3,
                                "FederatedFineTuneJob": 3}[kind.KIND], status_seen


# --- kubectl explain --------------------------------------------------------------------------

def _object_nodes(schema: dict, path: str):
    """(explain path, node) of every object node with properties (its fields get explained)."""
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        schema = schema["items"]
    if "properties" in schema:
        yield path, schema
        for name, sub in schema["properties"].items():
            if name not in ("metadata", "apiVersion", "kind"):
                yield from _object_nodes(sub, f"{path}.{name}")


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_kubectl_explain_shows_every_description(real_cluster, crds, kind):
    schema = openapi_schema(kind)
    checked = 0
    for path, node in _object_nodes(schema, kind.PLURAL):
        out = _flat(real_cluster.kubectl("explain", path).stdout)
        if "description" in node and path != kind.PLURAL:
            assert _flat(node["description"]) in out, f"kubectl explain {path}: its description is missing"
        for name, sub in node["properties"].items():
            if name == "metadata" and path == kind.PLURAL:
                continue
            assert re.search(rf"\b{re.escape(name)}\s+<", out), f"kubectl explain {path}: no field {name}"
            desc = _flat(sub.get("description", ""))
            assert desc and desc in out, f"kubectl explain {path}: description of {name} missing: {desc!r}"
            checked += 1
    assert _flat(schema["description"]) in _flat(real_cluster.kubectl("explain", kind.PLURAL).stdout)
    assert checked >= {"Dataset": 40, "FineTuneJob": 120, "GovernancePolicy": 15, "SyntheticDataset": 40,
                       "FederatedFineTuneJob": 60}[kind.KIND]


# --- printer columns --------------------------------------------------------------------------

def _table(real_cluster, *args) -> list[list[str]]:
    out = real_cluster.kubectl("get", *args).stdout
    return [re.split(r"\s{2,}", line.strip()) for line in out.strip().splitlines()]


def test_printer_columns_show_headers_and_status_values(real_cluster, crds, namespace):
    ds = yaml.safe_load((REPO / "examples" / "quickstart" / "dataset.yaml").read_text())
    job = yaml.safe_load((REPO / "examples" / "quickstart" / "finetunejob.yaml").read_text())
    real_cluster.apply([ds, job], "-n", namespace)
    rows = _table(real_cluster, "ftj", "-n", namespace)
    assert rows[0] == ["NAME", "PHASE", "PROGRESS", "BASE MODEL", "PROMOTION", "AGE"]
    assert rows[1][0] == "support-assistant" and job["spec"]["baseModel"]["uri"] in rows[1]  # no status yet
    rows = _table(real_cluster, "ftds", "-n", namespace)  # (ds is a DaemonSet's short name)
    assert rows[0] == ["NAME", "PHASE", "FORMAT", "EXAMPLES", "AGE"]

    digest = "sha256:" + "ab" * 32
    real_cluster.kubectl("patch", "ftj", "support-assistant", "-n", namespace, "--subresource=status", "--type=merge",
                         "-p", json.dumps({"status": {"phase": "Training", "progress": {"percent": 42},
                                                      "adapter": {"uri": "s3://a/b", "digest": digest},
                                                      "promotion": {"state": "AwaitingApproval"}}}))
    real_cluster.kubectl("patch", "ftds", "support-answers", "-n", namespace, "--subresource=status",
                         "--type=merge", "-p", json.dumps({"status": {"phase": "Ready", "stats": {"examples": 120},
                                                                      "digest": digest}}))
    rows = _table(real_cluster, "ftj", "-n", namespace, "-o", "wide")
    assert rows[0] == ["NAME", "PHASE", "PROGRESS", "BASE MODEL", "ADAPTER", "PROMOTION", "AGE"]
    assert rows[1][:6] == ["support-assistant", "Training", "42", job["spec"]["baseModel"]["uri"], digest,
                           "AwaitingApproval"]
    rows = _table(real_cluster, "ftds", "-n", namespace, "-o", "wide")
    assert rows[0] == ["NAME", "PHASE", "FORMAT", "EXAMPLES", "DIGEST", "AGE"]
    assert rows[1][:5] == ["support-answers", "Ready", ds["spec"]["format"], "120", digest]
    # The short names and the category work too.
    assert "support-assistant" in real_cluster.kubectl("get", "finetune", "-n", namespace).stdout

    policy = yaml.safe_load((REPO / "examples" / "cluster" / "governancepolicy.yaml").read_text())
    policy["metadata"]["name"] = f"columns-{namespace}"
    real_cluster.apply(policy)
    try:
        rows = _table(real_cluster, "ftgp", policy["metadata"]["name"])
    finally:
        real_cluster.kubectl("delete", "ftgp", policy["metadata"]["name"], "--wait=false")
    assert rows[0] == ["NAME", "REQUIRED", "NAMESPACES", "AGE"]
    assert rows[1][1] == json.dumps(policy["spec"]["required"], separators=(",", ":"))
    assert rows[1][2] == json.dumps(policy["spec"]["namespaces"], separators=(",", ":"))


# --- examples and invalid manifests -----------------------------------------------------------

@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_example_is_accepted_by_the_server(real_cluster, crds, namespace, path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:  # an example's own namespaces (a federation's sites) are the test namespace here
        doc.get("metadata", {}).pop("namespace", None)
    proc = real_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                input=yaml.safe_dump_all(docs))
    assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout


def test_there_are_enough_invalid_manifests_of_every_kind():
    kinds = [yaml.safe_load(p.read_text())["kind"] for p in INVALID]
    assert len(INVALID) >= 43
    assert {k: kinds.count(k) >= 5 for k in ("FineTuneJob", "Dataset", "GovernancePolicy")} == {
        "FineTuneJob": True, "Dataset": True, "GovernancePolicy": True}


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_rejected_by_the_server_naming_the_field(real_cluster, crds, namespace, path):
    expected = _expected_field(path)
    proc = real_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert proc.returncode != 0, f"the API server accepted {path.name}: {proc.stdout}"
    assert expected in proc.stderr, f"the server's error does not name {expected}: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    with pytest.raises(ManifestError) as info:  # and ours names the same field
        validate_manifest(yaml.safe_load(path.read_text()))
    assert expected in info.value.fields, info.value.errors


# --- the Job built from an accepted FineTuneJob -----------------------------------------------

#: Every pass-through field of spec / spec.resources set, to values a real cluster would take.
PASS_THROUGH = {
    "image": "registry.example.com/ml/trainer@sha256:" + "0" * 64,
    "resources": {
        "gpusPerNode": 2,
        "gpuResourceName": "amd.com/gpu",
        "gpuNodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200", "pool": "training"},
        "priorityClassName": "ml.training-high",
        "queueName": "team-a",
        "cpu": "8", "memory": "64Gi",
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "sku", "operator": "Equal", "value": "gpu"},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": 600},
            {"operator": "Exists"},
        ],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40000"]},
                                          {"key": "zone", "operator": "In", "values": ["a", "b"]},
                                          {"key": "spot", "operator": "DoesNotExist"}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-1"]}]}]},
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 10, "preference": {"matchExpressions": [
                        {"key": "nvidia.com/gpu.product", "operator": "NotIn", "values": ["NVIDIA-T4"]}]}}],
            },
            "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/zone",
                                                    "labelSelector": {"matchLabels": {"app": "datasets-cache"}}}}]},
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "kubernetes.io/hostname",
                 "labelSelector": {"matchExpressions": [{"key": "finetune.dev/role", "operator": "In",
                                                         "values": ["trainer"]}]},
                 "namespaceSelector": {}, "namespaces": ["ml-team"]}]},
        },
    },
}


def _server_create(real_cluster, obj: dict, namespace: str) -> dict:
    """`kubectl create --dry-run=server` of obj; the object as the server would store it."""
    proc = real_cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-",
                                input=json.dumps(obj))
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", ["trainer", "a" * 50 + ".with-dots." + "b" * 2])
def test_job_built_from_an_accepted_finetunejob_is_accepted(real_cluster, crds, namespace, name):
    name = name[:63]
    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"baseModel": {"uri": "s3://models/m"}, "datasetRef": {"name": "d"},
                         "output": {"uri": "s3://out/x"}, "backoffLimit": 2, "activeDeadlineSeconds": 3600,
                         **copy.deepcopy(PASS_THROUGH)}}
    ftj = _server_create(real_cluster, manifest, namespace)  # accepted, with the server's defaults
    assert ftj["spec"]["resources"]["tolerations"][1]["operator"] == "Equal"
    ftj["metadata"]["uid"] = "0d0b6f1e-0000-4000-8000-000000000001"  # dry runs get no uid
    # The test namespace stands in for the operator's, where governance Jobs go.
    config = OperatorConfig(trainer_image="ghcr.io/finetune-operator/trainer:0.1.0", namespace=namespace)
    train_cfg = children.trainer_config(ftj, "s3://data/v", "chat", None, 15)
    cm, job = children.trainer_children(ftj, 1, train_cfg, config)
    stored = _server_create(real_cluster, job, namespace)
    pod = stored["spec"]["template"]["spec"]
    assert pod["affinity"] == PASS_THROUGH["resources"]["affinity"]
    assert pod["priorityClassName"] == "ml.training-high"
    assert pod["containers"][0]["image"] == PASS_THROUGH["image"]
    assert pod["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "2"
    assert len(pod["tolerations"]) == 4
    _server_create(real_cluster, cm, namespace)
    gov_name = children.governance_job_name(name, "sha256:" + "1" * 64, "sha256:" + "2" * 64, 1, namespace)
    (gov_job,) = children.governance_children(ftj, gov_name, {**train_cfg, "metricsPort": 0}, config)
    stored = _server_create(real_cluster, gov_job, namespace)  # downward-API config, signing key volume, labels
    gov_pod = stored["spec"]["template"]["spec"]
    assert gov_pod["automountServiceAccountToken"] is False and gov_pod["terminationGracePeriodSeconds"] == 300
    assert stored["spec"]["template"]["metadata"]["annotations"][children.CONFIG_ANNOTATION]
    assert gov_pod["containers"][0]["image"] == "ghcr.io/finetune-operator/trainer:0.1.0"  # not spec.image
    _server_create(real_cluster, children.job_network_policy(namespace, config), namespace)


#: Pass-through values the schema refuses, each of which the Pod API would also refuse in the Job.
BAD_PASS_THROUGH = {
    "toleration Exists with a value": {"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]},
    "tolerationSeconds without NoExecute": {"tolerations": [{"key": "a", "operator": "Exists",
                                                             "effect": "NoSchedule", "tolerationSeconds": 5}]},
    "toleration without key, operator Equal": {"tolerations": [{"operator": "Equal", "value": "x"}]},
    "toleration key not a qualified name": {"tolerations": [{"key": "a b", "operator": "Exists"}]},
    "toleration value not a label value": {"tolerations": [{"key": "a", "value": "x y"}]},
    "toleration key prefix too long": {"tolerations": [{"key": "p" * 254 + "/a", "operator": "Exists"}]},
    "priorityClassName not a subdomain": {"priorityClassName": "High_Priority"},
    "gpuResourceName without a domain": {"gpuResourceName": "gpu"},
    "gpuResourceName native": {"gpuResourceName": "kubernetes.io/gpu"},
    "gpuNodeSelector key": {"gpuNodeSelector": {"a b": "x"}},
    "gpuNodeSelector value": {"gpuNodeSelector": {"a": "x y"}},
    "node affinity In without values": {"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In"}]}]}}}},
    "node affinity Exists with values": {"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "Exists", "values": ["a"]}]}]}}}},
    "node affinity no terms": {"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}},
    "node affinity weight 0": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 0, "preference": {}}]}}},
    "pod anti-affinity empty topologyKey": {"affinity": {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": ""}]}}},
    "pod affinity selector value": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": "zone", "labelSelector": {"matchLabels": {"app": "not a value"}}}]}}},
    "pod affinity bad namespace": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": "zone", "namespaces": ["Not_A_Namespace"]}]}}},
    "affinity field typo": {"affinity": {"nodeAffinity": {"requiredDuringScheduling": {}}}},
    "image with whitespace": {"image": "trainer image"},
}
#: Refused although the Job API would take them: values that can never work on a node.
STRICTER_ON_PURPOSE = {
    # Only leading/trailing whitespace is a Pod API error; no registry has an image reference with a space.
    "image with whitespace",
    # The kubelet refuses device plugins for kubernetes.io/ names, so no node ever has such a resource.
    "gpuResourceName native",
}


@pytest.mark.parametrize("case", list(BAD_PASS_THROUGH), ids=lambda c: c.replace(" ", "-"))
def test_bad_pass_through_is_refused_at_apply_time_not_at_job_creation(real_cluster, crds, namespace, case):
    patch = copy.deepcopy(BAD_PASS_THROUGH[case])
    spec = {"baseModel": {"uri": "s3://models/m"}, "datasetRef": {"name": "d"}, "output": {"uri": "s3://out/x"},
            "resources": {"gpusPerNode": 1}}
    if "image" in patch:
        spec["image"] = patch.pop("image")
    spec["resources"].update(patch)
    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": "bad-pass-through", "namespace": namespace}, "spec": spec}
    proc = real_cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(manifest),
                                check=False)
    assert proc.returncode != 0 and "spec." in proc.stderr, f"the server accepted the FineTuneJob: {proc.stdout}"
    with pytest.raises(ManifestError):
        validate_manifest(manifest)
    # Had it been accepted, the operator's Job would have failed at creation: the check is not stricter
    # than the Pod API. (A typo in a field name: kubectl asks for strict validation and is refused; a client
    # that does not, like the operator, gets the field silently pruned from the Job.)
    ftj = {**manifest, "metadata": {**manifest["metadata"], "uid": "0d0b6f1e-0000-4000-8000-000000000002"}}
    cm, job = children.trainer_children(ftj, 1, children.trainer_config(ftj, "s3://d/v", "chat", None, 15),
                                        OperatorConfig())
    proc = real_cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(job),
                                check=False)
    if case == "affinity field typo":
        assert proc.returncode != 0 and "unknown field" in proc.stderr, proc.stderr
    elif case in STRICTER_ON_PURPOSE:
        assert proc.returncode == 0, f"the Pod API refuses {case} as well now: {proc.stderr}"
    else:
        assert proc.returncode != 0, f"the Pod API accepts {case}: the schema is stricter than it needs to be"


def test_validation_job_of_a_longest_named_dataset_is_accepted(real_cluster, crds, namespace):
    """A Dataset name of the longest length the schema takes (63) still gives a valid validation Job
    (its name is shortened with a hash, and the name as a label value fits)."""
    name = "d" * 40 + ".support." + "e" * 14
    assert len(name) == 63
    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": name},
                "spec": {"source": {"uri": "s3://data/x.jsonl"}, "format": "chat", "provenance": {"origin": "t"}}}
    ds = _server_create(real_cluster, manifest, namespace)
    ds["metadata"].update(uid="0d0b6f1e-0000-4000-8000-000000000003", generation=1)
    cm, job = children.validation_children(ds, OperatorConfig(artifact_store="s3://artifacts/store"))
    assert len(job["metadata"]["name"]) <= 63
    _server_create(real_cluster, job, namespace)
    _server_create(real_cluster, cm, namespace)
    too_long = {**manifest, "metadata": {"name": name + "x"}}
    proc = real_cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(too_long),
                                check=False)
    assert proc.returncode != 0 and "metadata.name: Too long" in proc.stderr, proc.stderr

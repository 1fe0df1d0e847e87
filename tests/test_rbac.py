"""The chart's RBAC is least privilege, for every value set (tests/helm-values/ + defaults + a few
combinations of our own), read off the objects a real helm binary renders.

Rather than compare rule lists, the tests ask what the operator's ServiceAccount may do in a given
namespace, with a small evaluator of the rendered (Cluster)Roles and their bindings that follows
the RBAC authorizer's rules (a ClusterRoleBinding grants its ClusterRole everywhere, a RoleBinding
its Role in its own namespace; resourceNames restrict a rule to those names; no wildcards -- a test
refuses them). tests/realcluster/test_rbac.py asks the real API server the same questions with
`kubectl auth can-i`.
"""

from __future__ import annotations

import re
import subprocess
from typing import Optional

import pytest

from test_helm import (CHART, NAMESPACE, RELEASE, VALUE_SETS, helm, of_kind, one, release_objects,  # noqa: F401
                       render, values_of)
from testutil import REPO

#: Value sets beyond tests/helm-values/: (base value set, extra helm arguments).
COMBINATIONS = {
    "namespaced-standalone": ("namespaced", ["--set", "peering.enabled=false", "--set", "replicaCount=1"]),
    "renamed": ("default", ["--set", "fullnameOverride=ml-ops", "--set", "serviceAccount.name=ml-ops-sa"]),
    "old-values-file": ("default", ["--set", "rbac.readSecrets=false"]),  # still accepted, grants nothing
}
ALL_SETS = VALUE_SETS + sorted(COMBINATIONS)
UNWATCHED = "some-other-team"  # a namespace no value set lists


@pytest.fixture(scope="module")
def charts(helm) -> dict[str, list[dict]]:
    out = {name: render(helm, name) for name in VALUE_SETS}
    for name, (base, extra) in COMBINATIONS.items():
        out[name] = render(helm, base, *extra)
    return out


def values_for(name: str) -> dict:
    base, extra = COMBINATIONS.get(name, (name, []))
    values = values_of(base)
    if "peering.enabled=false" in extra:
        values["peering"]["enabled"] = False
    return values


def watched_of(name: str) -> list[str]:
    return list(values_for(name)["watch"]["namespaces"])


# --- an evaluator of the rendered RBAC ------------------------------------------------------------


def service_account(objects: list[dict]) -> tuple[str, str]:
    deploy = one(objects, "Deployment")
    return deploy["metadata"]["namespace"], deploy["spec"]["template"]["spec"]["serviceAccountName"]


def bound_rules(objects: list[dict], sa: tuple[str, str]) -> list[tuple[Optional[str], dict]]:
    """(namespace the rule applies in -- None: every namespace --, rule) for each rule bound to sa."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objects if o["kind"] in ("Role", "ClusterRole")}
    out = []
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        subjects = {(s.get("namespace"), s["name"]) for s in binding["subjects"] if s["kind"] == "ServiceAccount"}
        if sa not in subjects:
            continue
        ns = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        out += [(ns, rule) for rule in role["rules"]]
    return out


def can(objects: list[dict], verb: str, resource: str, namespace: Optional[str], group: str = "",
        name: Optional[str] = None, sa: Optional[tuple[str, str]] = None) -> bool:
    """May the operator's ServiceAccount (or sa) do `verb` on group/resource[/name] in namespace?
    resource may carry a subresource ("pods/log"). namespace None = a cluster-scoped request."""
    for ns, rule in bound_rules(objects, sa or service_account(objects)):
        if ns is not None and ns != namespace:
            continue
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            names = rule.get("resourceNames")
            if not names or name in names:
                return True
    return False


def all_rules(objects: list[dict]) -> list[tuple[dict, dict]]:
    return [(o, r) for o in objects if o["kind"] in ("ClusterRole", "Role") for r in o["rules"]]


def user_role(obj: dict) -> bool:
    """A ClusterRole for people (templates/user-roles.yaml): bound by nobody in the chart."""
    return obj["kind"] == "ClusterRole" and obj["metadata"]["name"].endswith(USER_ROLE_SUFFIXES)


USER_ROLE_SUFFIXES = ("-view", "-edit", "-reviewer")


def operator_objects(objects: list[dict]) -> list[dict]:
    """What the chart keeps for the operator itself: the release without hooks and the user roles."""
    return [o for o in release_objects(objects) if not user_role(o)]


def signing_secret(objects: list[dict]) -> str:
    return f"{one(operator_objects(objects), 'ClusterRole')['metadata']['name']}-signing"


# What the operator does in each namespace it watches: (group, resource) -> verbs.
IN_WATCHED = {
    ("finetune.dev", "finetunejobs"): {"get", "list", "watch", "patch", "update"},
    ("finetune.dev", "finetunejobs/status"): {"get", "patch", "update"},
    # create: a SyntheticDataset's Dataset of reviewed examples.
    ("finetune.dev", "datasets"): {"get", "list", "watch", "patch", "update", "create"},
    ("finetune.dev", "datasets/status"): {"get", "patch", "update"},
    ("finetune.dev", "syntheticdatasets"): {"get", "list", "watch", "patch", "update"},
    ("finetune.dev", "syntheticdatasets/status"): {"get", "patch", "update"},
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete", "patch"},
    ("", "configmaps"): {"create", "get", "list", "watch", "delete", "patch"},
    ("", "pods"): {"get", "list", "watch", "create"},  # create: the admission dry run of a Job's pod
    ("", "events"): {"create", "patch"},
    # the Job pods' egress policy; a federation's site policies (deleted by its finalizer)
    ("networking.k8s.io", "networkpolicies"): {"get", "create", "patch", "list", "delete"},
    ("", "services"): {"get", "create"},  # a multi-node trainer's headless Service, a SuperLink's
    ("finetune.dev", "federatedfinetunejobs"): {"get", "list", "watch", "patch", "update"},
    ("finetune.dev", "federatedfinetunejobs/status"): {"get", "patch", "update"},
    ("", "serviceaccounts"): {"get", "create", "list", "delete"},  # a federation's pods' own accounts
    ("serving.kserve.io", "llminferenceservices"): {"get", "patch"},  # kserve serving targets
}
# ... in its own namespace, where the governance Jobs run.
IN_OPERATOR_NAMESPACE = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete", "patch"},
    ("", "configmaps"): {"create", "get", "list", "watch", "delete", "patch"},
    ("", "pods"): {"get", "list", "watch", "create"},
    ("", "events"): {"create", "patch"},
    ("finetune.dev", "datasets"): {"get", "list", "watch"},
    ("finetune.dev", "finetunejobs"): {"get", "list", "watch"},
    ("finetune.dev", "syntheticdatasets"): {"get", "list", "watch"},
    ("finetune.dev", "federatedfinetunejobs"): {"get", "list", "watch"},
}
# ... and cluster-wide.
CLUSTER_WIDE = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("finetune.dev", "governancepolicies"): {"get", "list", "watch"},
}
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


# --- the rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_rbac_has_no_wildcards_and_nothing_that_escalates(charts, value_set):
    rules = all_rules(charts[value_set])
    assert rules
    for obj, rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], (obj["metadata"]["name"], rule)
        assert not rule.get("nonResourceURLs")
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        assert not {"roles", "clusterroles", "rolebindings", "clusterrolebindings", "serviceaccounts/token",
                    "pods/exec", "pods/attach", "pods/portforward", "nodes/proxy"} & set(rule["resources"])


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_the_operator_may_do_what_it_does_where_it_does_it(charts, value_set):
    objects = charts[value_set]
    watched = watched_of(value_set) or ["team-x", UNWATCHED]  # empty list: every namespace
    for ns in watched:
        for (group, resource), verbs in IN_WATCHED.items():
            for verb in verbs:
                assert can(objects, verb, resource, ns, group), (value_set, ns, group, resource, verb)
    for (group, resource), verbs in IN_OPERATOR_NAMESPACE.items():
        for verb in verbs:
            assert can(objects, verb, resource, NAMESPACE, group), (value_set, group, resource, verb)
    for (group, resource), verbs in CLUSTER_WIDE.items():
        for verb in verbs:
            assert can(objects, verb, resource, None, group), (value_set, group, resource, verb)
    # GovernancePolicies are read-only.
    assert not any(can(objects, v, "governancepolicies", None, "finetune.dev") for v in ("create", "patch", "delete"))
    # The signing key: read and updated by name, created (create cannot be restricted by name).
    key = signing_secret(objects)
    for verb in ("get", "patch", "update"):
        assert can(objects, verb, "secrets", NAMESPACE, name=key)
    assert can(objects, "create", "secrets", NAMESPACE)
    # Peering: the (Cluster)KopfPeering objects Kopf patches.
    if values_for(value_set)["peering"]["enabled"]:
        if watched_of(value_set):
            for ns in watched_of(value_set) + [NAMESPACE]:  # Kopf watches its own namespace too
                assert can(objects, "patch", "kopfpeerings", ns, "kopf.dev", name="x")
        else:
            assert can(objects, "patch", "clusterkopfpeerings", None, "kopf.dev", name="x")


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_no_secret_is_readable_but_the_signing_key_and_no_pod_log_anywhere(charts, value_set):
    objects = charts[value_set]
    key = signing_secret(objects)
    for ns in [NAMESPACE, UNWATCHED, "kube-system", *watched_of(value_set)]:
        for verb in ("get", "list", "watch", "update", "patch", "delete", "deletecollection"):
            assert not can(objects, verb, "secrets", ns), (value_set, ns, verb)  # any name / all of them
            assert not can(objects, verb, "secrets", ns, name="finetune-s3"), (value_set, ns, verb)
        assert not can(objects, "get", "pods/log", ns), (value_set, ns)
        if ns != NAMESPACE:
            assert not can(objects, "get", "secrets", ns, name=key), (value_set, ns)
            assert not can(objects, "create", "secrets", ns), (value_set, ns)
    assert not can(objects, "list", "secrets", None)  # cluster-wide list (kubectl get secrets -A)


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_no_clusterrole_mentions_secrets_or_pod_logs(charts, value_set):
    for obj, rule in all_rules(charts[value_set]):  # the uninstall hook's too
        forbidden = {"secrets", "pods/log"} & set(rule["resources"])
        if obj["kind"] == "ClusterRole":
            assert not forbidden, (obj["metadata"]["name"], rule)
        elif "pods/log" in forbidden:
            raise AssertionError(f"{obj['metadata']['name']}: pods/log: {rule}")


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_secrets_only_in_the_operator_namespace_and_only_by_name_except_create(charts, value_set):
    objects = charts[value_set]
    key = signing_secret(objects)
    secret_rules = [(o, r) for o, r in all_rules(objects) if "secrets" in r["resources"]]
    assert secret_rules
    for obj, rule in secret_rules:
        assert obj["kind"] == "Role" and obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]
        assert rule["resources"] == ["secrets"] and rule["apiGroups"] == [""]
        if rule.get("resourceNames"):
            assert rule["resourceNames"] == [key]
            assert set(rule["verbs"]) <= {"get", "patch", "update"}
        else:
            assert rule["verbs"] == ["create"]


@pytest.mark.parametrize("value_set", [s for s in ALL_SETS if watched_of(s)])
def test_a_namespace_list_gets_roles_only_in_those_namespaces_and_the_operator_namespace(charts, value_set):
    objects = operator_objects(charts[value_set])
    watched = watched_of(value_set)
    assert {r["metadata"]["namespace"] for r in of_kind(objects, "Role")} == set(watched) | {NAMESPACE}
    assert {b["metadata"]["namespace"] for b in of_kind(objects, "RoleBinding")} == set(watched) | {NAMESPACE}
    # The cluster-wide part holds only what cannot be namespaced: CRD discovery and policies.
    assert {res for r in one(objects, "ClusterRole")["rules"] for res in r["resources"]} == \
        {"customresourcedefinitions", "governancepolicies"}
    # Nothing on namespaced resources outside the list (and the operator's own namespace).
    for (group, resource) in IN_WATCHED:
        for verb in VERBS:
            assert not can(objects, verb, resource, UNWATCHED, group), (value_set, group, resource, verb)
    sa_ns, sa_name = service_account(objects)
    for binding in of_kind(objects, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_ns}]
        role = next(r for r in of_kind(objects, "Role") if r["metadata"]["namespace"] ==
                    binding["metadata"]["namespace"] and r["metadata"]["name"] == binding["roleRef"]["name"])
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
    if values_for(value_set)["peering"]["enabled"]:
        assert {p["metadata"]["namespace"] for p in of_kind(objects, "KopfPeering")} >= set(watched)
        assert not of_kind(objects, "ClusterKopfPeering")


def test_every_namespace_mode_binds_one_clusterrole_and_the_operator_namespace_role(charts):
    objects = operator_objects(charts["default"])
    binding = one(objects, "ClusterRoleBinding")
    sa = one(objects, "ServiceAccount")
    assert binding["roleRef"]["name"] == one(objects, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    # The only Role: the operator's namespace (governance Jobs, the signing key).
    role, role_binding = one(objects, "Role"), one(objects, "RoleBinding")
    assert role["metadata"]["namespace"] == role_binding["metadata"]["namespace"] == NAMESPACE
    assert role_binding["roleRef"]["name"] == role["metadata"]["name"]
    # A watched namespace that is also the operator's own gets two distinct Roles, not one clobbering the other.
    assert role["metadata"]["name"] != one(objects, "ClusterRole")["metadata"]["name"]


def test_renamed_release_names_its_signing_key_and_service_account(charts):
    objects = charts["renamed"]
    assert signing_secret(objects) == "ml-ops-signing"
    assert service_account(objects) == (NAMESPACE, "ml-ops-sa")
    assert can(objects, "get", "secrets", NAMESPACE, name="ml-ops-signing")
    assert not can(objects, "get", "secrets", NAMESPACE, name="finetune-operator-signing")


def test_read_secrets_true_is_refused_naming_the_field(helm):
    for extra in (["--set", "rbac.readSecrets=true"], ["--set", "rbac.readSecrets=true", "--skip-schema-validation"]):
        result = subprocess.run([helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0, extra
        assert "readSecrets" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_operator_never_reads_pod_logs():
    """The rules grant no pods/log: the operator's code (ftctl aside, which uses the user's own
    kubeconfig) must not need it."""
    root = REPO / "operator" / "finetune_operator"
    offenders = [str(p.relative_to(REPO)) for p in root.rglob("*.py") if "ftctl" not in p.parts
                 and re.search(r"read_namespaced_pod_log|pods/[^\"']*/log|/log\?", p.read_text())]
    assert not offenders, offenders


def test_docs_list_no_pod_log_or_cluster_wide_secret_rights():
    ops = (REPO / "docs" / "operations.md").read_text()
    section = ops[ops.index("### RBAC"):ops.index("## Uninstall")]
    assert "pods/log" not in re.sub(r"(?i)no `pods/log`", "", section)  # only where it says there is none
    assert "readSecrets" not in section or "removed" in section
    assert "networkpolicies" in section and "-signing" in section



def test_user_roles_read_or_edit_our_resources_never_their_status_and_aggregate_only_view_and_edit(helm, charts):
    roles = {o["metadata"]["name"]: o for o in release_objects(charts["default"]) if user_role(o)}
    view, edit, reviewer = (next(r for n, r in roles.items() if n.endswith(f"-{k}")) for k in ("view", "edit", "reviewer"))
    kinds = {"datasets", "finetunejobs", "syntheticdatasets", "federatedfinetunejobs"}
    for role in (view, edit, reviewer):
        for rule in role["rules"]:
            assert rule["apiGroups"] == ["finetune.dev"] and "governancepolicies" not in rule["resources"]
            if any(r.endswith("/status") for r in rule["resources"]):
                assert rule["verbs"] == ["get"], (role["metadata"]["name"], rule)  # status is the operator's
    assert {r for rule in view["rules"] for r in rule["resources"] if "/" not in r} == kinds
    assert {v for rule in view["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}
    assert {r for rule in edit["rules"] for r in rule["resources"]} == kinds
    assert {v for rule in reviewer["rules"] for v in rule["verbs"] if v not in ("get", "list", "watch")} == {"patch"}
    assert [rule["resources"] for rule in reviewer["rules"] if "patch" in rule["verbs"]] == [["syntheticdatasets"]]
    labels = lambda role: {k for k in role["metadata"]["labels"] if k.startswith("rbac.authorization.k8s.io/")}  # noqa: E731
    assert labels(view) == {f"rbac.authorization.k8s.io/aggregate-to-{r}" for r in ("view", "edit", "admin")}
    assert labels(edit) == {f"rbac.authorization.k8s.io/aggregate-to-{r}" for r in ("edit", "admin")}
    assert labels(reviewer) == set()
    # No bindings for them in the chart: who gets them is the platform's RoleBindings' business.
    assert not [b for b in of_kind(charts["default"], "RoleBinding") + of_kind(charts["default"], "ClusterRoleBinding")
                if b["roleRef"]["name"] in {r["metadata"]["name"] for r in roles.values()}]
    unaggregated = render(helm, "default", "--set", "rbac.userRoles.aggregate=false")
    assert not [o for o in unaggregated if user_role(o) and labels(o)]
    assert not [o for o in render(helm, "default", "--set", "rbac.userRoles.create=false") if user_role(o)]

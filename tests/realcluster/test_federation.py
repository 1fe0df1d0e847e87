"""A FederatedFineTuneJob on the REAL control plane (issue 17): who may read what, asked of the real
RBAC authorizer, and every object the plan creates accepted by the real API server.

1. The operator (a subprocess, as tests/realcluster/operator_harness.py runs it) validates one
   consenting Dataset in each of two participant namespaces (fakenode runs the validation pods),
   then starts the federation: the coordinator's SuperLink/server objects and one site per
   participant namespace are created by the operator itself, i.e. accepted by the API server.
2. `kubectl auth can-i --as system:serviceaccount:...` (with the ServiceAccount's groups): the
   coordinator's ServiceAccount may not get or list any Secret or Dataset in either participant
   namespace (nor Secrets in its own); a site's ServiceAccount may not read the other site's
   credentials Secret, nor list Secrets anywhere. A site reads its own namespace's credentials only
   through its pod's secretKeyRef, which the kubelet resolves in the pod's namespace: the test checks
   that every secretKeyRef of a site's pod names that namespace's own credentials Secret.
3. Every object federation.plan_objects renders for a second federation (another name, so nothing
   exists yet) is accepted by a server-side dry run (`kubectl create --dry-run=server`, strict field
   validation): the ServiceAccounts, NetworkPolicies, Service, ConfigMaps and Jobs, in each namespace.
4. Deleting the federation: its finalizer deletes the site objects in the participant namespaces.

Runs in well under two minutes (two validation pods; no federated training: tests/federated/ has it).
"""

from __future__ import annotations

import json

import pytest

from realcluster import operator_harness as h
from realcluster.realk8s import RealCluster, wait_for

API = "finetune.dev/v1alpha1"
#: Any PEM certificate block: the API only checks the shape of spec.superlink.tls.caBundle.
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2Ex\n-----END CERTIFICATE-----\n"


@pytest.fixture(scope="module")
def stack(fakenode, crds, s3_server, tiny_model_dir, tmp_path_factory):
    with h.operator_stack(fakenode, s3_server, tiny_model_dir, tmp_path_factory.mktemp("operator")) as st:
        yield st


def can_i(cluster: RealCluster, namespace: str, account: str, verb: str, what: str, where: str) -> bool:
    """The real authorizer's answer for a ServiceAccount, with the groups its tokens carry."""
    args = ["auth", "can-i", verb, what, "-n", where, "--as", f"system:serviceaccount:{namespace}:{account}",
            "--as-group", "system:serviceaccounts", "--as-group", f"system:serviceaccounts:{namespace}",
            "--as-group", "system:authenticated"]
    proc = cluster.kubectl(*args, check=False)
    answer = proc.stdout.strip()
    assert proc.returncode in (0, 1) and answer in ("yes", "no"), (args, proc.stdout, proc.stderr)
    return answer == "yes"


def consenting_dataset(cluster: RealCluster, bucket: str, namespace: str, coordinator: str, federation: str) -> dict:
    manifest = h.dataset_manifest("notes", namespace, h.write_raw_dataset(bucket))
    manifest["metadata"]["annotations"] = {"finetune.dev/federation-consent": f"{coordinator}/*"}
    cluster.apply(manifest)
    return wait_for(lambda: (d := cluster.get("dataset", "notes", namespace)).get("status", {}).get("phase") == "Ready"
                    and d, timeout=90, interval=0.5, what=f"Dataset {namespace}/notes Ready")


def federation_manifest(name: str, coordinator: str, sites: list[str], stack) -> dict:
    return {"apiVersion": API, "kind": "FederatedFineTuneJob", "metadata": {"name": name, "namespace": coordinator},
            "spec": {"baseModel": {"uri": stack.model_uri}, "rounds": 2, "localSteps": 2, "minSites": 2,
                     "participants": [{"name": f"s{i}", "namespace": ns, "dataset": "notes"}
                                      for i, ns in enumerate(sites)],
                     "resources": {"gpusPerNode": 0, "cpu": "500m", "memory": "1Gi"},
                     "output": {"uri": f"s3://{stack.bucket}/federations/{name}"}}}


def test_federation_accounts_and_objects_on_the_real_api_server(stack):
    from finetune_operator import federation
    from finetune_operator.api.federated import FederatedFineTuneJob
    from finetune_operator.config import OperatorConfig

    c = stack.cluster
    coord = h.new_namespace(c, stack.prefix)
    sites = [h.new_namespace(c, stack.prefix), h.new_namespace(c, stack.prefix)]
    try:
        datasets = {ns: consenting_dataset(c, stack.bucket, ns, coord, "fed") for ns in sites}
        c.apply(federation_manifest("fed", coord, sites, stack))
        started = wait_for(lambda: (f := c.get("federatedfinetunejob", "fed", coord) or {}).get("status", {})
                           .get("phase") in ("Starting", "Training", "Failed") and f, timeout=60, interval=0.5,
                           what="the federation started")
        assert started["status"]["phase"] != "Failed", (started["status"], stack.op.logs()[-3000:])
        assert "finetune.dev/federation-cleanup" in started["metadata"]["finalizers"]

        # 1. What the operator created, the API server accepted and stored.
        for kind, name in (("serviceaccount", "fed-federation"), ("service", "fed-superlink"), ("job", "fed-superlink"),
                           ("job", "fed-server"), ("configmap", "fed-server"), ("networkpolicy", "fed-superlink")):
            assert c.get(kind, name, coord), (kind, name)
        site_account = federation.site_account(coord, "fed")
        for i, ns in enumerate(sites):
            job = c.get("job", federation.site_job_name(coord, "fed", f"s{i}"), ns)
            pod = job["spec"]["template"]["spec"]
            assert pod["serviceAccountName"] == site_account and pod["automountServiceAccountToken"] is False
            refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"] if "valueFrom" in e}
            assert refs == {h.SECRET}  # this namespace's own credentials Secret, resolved in this namespace
            assert c.get("serviceaccount", site_account, ns) and c.get("networkpolicy", site_account, ns)

        # 2. The real RBAC authorizer: nothing is bound to the federation's accounts.
        wait_for(lambda: c.get("serviceaccount", "fed-federation", coord), timeout=10, what="the coordinator account")
        for ns in sites:
            for verb in ("get", "list", "watch"):
                for what in ("secrets", f"secret/{h.SECRET}", "datasets.finetune.dev", "datasets.finetune.dev/notes"):
                    assert not can_i(c, coord, "fed-federation", verb, what, ns), (verb, what, ns)
        assert not can_i(c, coord, "fed-federation", "get", f"secret/{h.SECRET}", coord)
        assert not can_i(c, coord, "fed-federation", "list", "secrets", coord)
        for mine, other in ((sites[0], sites[1]), (sites[1], sites[0])):
            assert not can_i(c, mine, site_account, "get", f"secret/{h.SECRET}", other)
            assert not can_i(c, mine, site_account, "list", "secrets", other)
            assert not can_i(c, mine, site_account, "list", "secrets", mine)
            assert not can_i(c, mine, site_account, "get", "datasets.finetune.dev/notes", other)
            assert not can_i(c, mine, site_account, "get", f"secret/{h.SECRET}", coord)

        # 3. Every object the plan renders passes the real API server's validation and admission.
        dry = federation_manifest("dry", coord, sites, stack)
        dry["metadata"]["uid"] = "0d0b6f1e-0000-4000-8000-000000000017"  # a dry run gets no uid of its own
        cfg = OperatorConfig(trainer_image="ghcr.io/finetune-operator/trainer:realcluster",
                             s3_endpoint="http://127.0.0.1:9", s3_credentials_secret=h.SECRET,
                             artifact_store=f"s3://{stack.bucket}/store")
        observed = federation.Observed(datasets={(ns, "notes"): d for ns, d in datasets.items()})
        objects = federation.plan_objects(dry, FederatedFineTuneJob.model_validate(dry), observed, cfg)
        kinds = sorted({(o["kind"], o["metadata"]["namespace"]) for o in objects})
        assert kinds == sorted({(k, coord) for k in ("ServiceAccount", "Service", "NetworkPolicy", "ConfigMap", "Job")}
                               | {(k, ns) for ns in sites for k in ("ServiceAccount", "NetworkPolicy", "ConfigMap",
                                                                   "Job")})
        for obj in objects:
            proc = c.kubectl("create", "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-",
                             input=json.dumps(obj), check=False)
            assert proc.returncode == 0, (obj["kind"], obj["metadata"]["name"], proc.stderr)
            stored = json.loads(proc.stdout)
            assert obj["metadata"]["labels"].items() <= stored["metadata"]["labels"].items()

        # 3b. With a site in another cluster: the real server's CEL wants the remote port's certificate and
        # address, and accepts the remote port (Service type, Secret volumes of the SuperLink, join bundle).
        remote = federation_manifest("far", coord, sites, stack)
        remote["spec"]["participants"].append({"name": "west", "remote": {"credentialsSecret": "west-key"}})
        proc = c.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(remote), check=False)
        assert proc.returncode != 0 and "spec.superlink" in proc.stderr and "remote participant" in proc.stderr, \
            proc.stderr
        remote["spec"]["superlink"] = {"serviceType": "NodePort", "externalAddress": "fed.example.org:31095",
                                       "serviceAnnotations": {"example.org/exposed-by": "realcluster-test"},
                                       "tls": {"secretName": "far-remote-tls", "caBundle": CA_PEM}}
        proc = c.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(remote), check=False)
        assert proc.returncode == 0, proc.stderr
        remote = json.loads(proc.stdout)
        remote["metadata"]["uid"] = "0d0b6f1e-0000-4000-8000-000000000018"
        objects = federation.plan_objects(remote, FederatedFineTuneJob.model_validate(remote), observed, cfg)
        assert ("ConfigMap", "far-join-west") in {(o["kind"], o["metadata"]["name"]) for o in objects}
        for obj in objects:
            proc = c.kubectl("create", "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-",
                             input=json.dumps(obj), check=False)
            assert proc.returncode == 0, (obj["kind"], obj["metadata"]["name"], proc.stderr)
            stored = json.loads(proc.stdout)
            if obj["kind"] == "Service":
                assert stored["spec"]["type"] == "NodePort"
                assert {p["name"] for p in stored["spec"]["ports"]} == {"api", "health", "remote"}
                assert all(p.get("nodePort") for p in stored["spec"]["ports"])  # the server allocated them

        # 4. Deleting the federation deletes its site objects in the other namespaces (the finalizer).
        c.kubectl("delete", "federatedfinetunejob", "fed", "-n", coord, "--wait=true", "--timeout=60s")
        for i, ns in enumerate(sites):
            name = federation.site_job_name(coord, "fed", f"s{i}")
            wait_for(lambda: c.get("job", name, ns, check=False) is None, timeout=30, what=f"site Job in {ns} deleted")
            assert c.get("configmap", name, ns, check=False) is None
            assert c.get("serviceaccount", site_account, ns, check=False) is None
            assert c.get("networkpolicy", site_account, ns, check=False) is None
    finally:
        c.kubectl("delete", "federatedfinetunejobs", "--all", "-n", coord, "--wait=true", "--timeout=30s", check=False)
        for obj in c.list("federatedfinetunejobs", coord):
            c.kubectl("patch", "federatedfinetunejob", obj["metadata"]["name"], "-n", coord, "--type=merge",
                      "-p", '{"metadata": {"finalizers": null}}', check=False)
        for ns in (coord, *sites):
            h.delete_namespace(c, ns)

"""End to end: a FederatedFineTuneJob over three participant namespaces, with the real operator.

The operator runs for real against the emulated API server; the fake kubelet runs the pods. The
Flower runtime itself is tested in tests/federated/; here the pods run stand-ins that keep its
contract (docs/federated.md): each site reads its own config and its own Dataset with the
credentials of its namespace and records what it saw in its scratch folder; the server writes
progress.json round by round (a site drops out of round 2) and a real adapter with the trainer's
manifest. What is asserted is the operator's part: the objects in each namespace, status from
progress.json, the SiteDropout Event, the governance gate and the promotion, and the finalizer
deleting the site objects in the other namespaces.
"""

from __future__ import annotations

import json
import sys
import textwrap

from kube_emulator import wait_for
from operator_e2e import API, SECRET

from finetune_operator.conditions import get_condition
from finetune_trainer import storage

COORD = "coord"
SITES = (("north", "team-north"), ("south", "team-south"), ("east", "team-east"))

SITE = textwrap.dedent("""
    import json, os, sys
    from finetune_trainer import storage
    cfg = json.load(open(sys.argv[1]))
    rows = storage.read_text(cfg["data"]["uri"] + "/train.jsonl").splitlines()
    storage.write_text(cfg["scratchURI"] + "/seen.json", json.dumps({
        "site": cfg["site"], "data": cfg["data"]["uri"], "rows": len(rows), "superlink": cfg["superlink"],
        "key": os.environ.get("AWS_ACCESS_KEY_ID")}))
""")

SERVER = textwrap.dedent("""
    import json, sys, tempfile, time
    from pathlib import Path
    from finetune_trainer import adapter, storage
    cfg = json.load(open(sys.argv[1]))
    out = cfg["outputURI"]
    sites = [s["site"] for s in cfg["sites"]]
    def progress(rounds, state="Training", **extra):
        record = {"state": state, "currentRound": len(rounds), "totalRounds": cfg["rounds"], "rounds": rounds,
                  "privacy": {"secureAggregation": cfg["secureAggregation"]}, **extra}
        storage.write_text(out + "/federation/progress.json", json.dumps(record))
    def round_(n, loss, reported):
        return {"round": n, "sitesSelected": len(sites), "sitesReported": len(reported), "heldOutLoss": loss,
                "seconds": 1.5, "sites": [{"site": s, "examples": 12, "localLoss": loss + 0.1, "evalLoss": loss}
                                          for s in reported]}
    rounds = [round_(1, 2.0, sites)]
    progress(rounds)
    time.sleep(2)
    rounds.append(round_(2, 1.5, sites[:-1]))
    progress(rounds, droppedSites=sites[-1:])
    time.sleep(2)
    rounds.append(round_(3, 1.2, sites))
    folder = Path(tempfile.mkdtemp())
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")
    manifest = adapter.build_manifest(folder, base_model=cfg["model"]["baseModel"], dataset={"sites": cfg["sites"]},
                                      training={}, metrics={})
    result = adapter.publish(folder, manifest, out, "fed", {})
    # The sites' own check numbers, for the checks the operator's server config asks for (the policy's pii).
    checks = [{"site": s, "pii": {"findings": {}, "probed": 3, "memorized": 0, "memorizationRate": 0.0}}
              for s in sites] if "pii" in cfg["siteChecks"]["checks"] else []
    # Every site's final evaluation: the adapter and the base model on its own eval split.
    final = {"sites": [{"site": s, "evalLoss": 1.1, "baseEvalLoss": 2.2, "evalExamples": 5} for s in sites],
             "heldOutLoss": 1.1, "baseHeldOutLoss": 2.2}
    progress(rounds, state="Succeeded", adapter={"uri": result["adapterURI"], "digest": result["digest"]},
             siteChecks=checks, finalEvaluation=final)
""")


def participant_dataset(cluster, bucket: str, site: str, ns: str) -> None:
    """A validated Dataset in the site's namespace that consents to the federation."""
    from trainer.helpers import write_dataset

    uri = write_dataset(f"s3://{bucket}/{ns}/validated/notes")
    cluster.create({"apiVersion": API, "kind": "Dataset",
                    "metadata": {"name": "notes", "namespace": ns,
                                 "annotations": {"finetune.dev/federation-consent": f"{COORD}/triage"}},
                    "spec": {"source": {"uri": f"s3://{bucket}/{ns}/raw.jsonl"}, "format": "chat",
                             "provenance": {"origin": "tests", "license": "CC0-1.0", "consent": "not-required"}},
                    "status": {"phase": "Ready", "observedGeneration": 1, "validatedURI": uri,
                               "digest": "sha256:" + site.encode().hex().ljust(64, "0"), "piiFindings": {},
                               "stats": {"examples": 48}}})


def federation_manifest(bucket: str, model_uri: str) -> dict:
    return {"apiVersion": API, "kind": "FederatedFineTuneJob", "metadata": {"name": "triage", "namespace": COORD},
            "spec": {"baseModel": {"uri": model_uri}, "rounds": 3, "localSteps": 2, "minSites": 2,
                     "participants": [{"name": s, "namespace": ns, "dataset": "notes"} for s, ns in SITES],
                     "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "1Gi"},
                     "output": {"uri": f"s3://{bucket}/federations/triage"}}}


def fed(cluster) -> dict:
    return cluster.get(API, "federatedfinetunejobs", COORD, "triage") or {}


def test_federation_over_three_namespaces(cluster, env, kubelet, operator):
    bucket = env["bucket"]
    py = sys.executable
    kubelet.declare("triage-superlink", command=[py, "-c", "import time; time.sleep(120)"])
    kubelet.declare("triage-server", command=[py, "-c", SERVER, "/etc/finetune/federation.json"])
    kubelet.declare(f"{COORD}-triage-site-", command=[py, "-c", SITE, "/etc/finetune/federation.json"])
    for ns in [COORD, *(n for _, n in SITES)]:
        cluster.secret(SECRET, {"AWS_ACCESS_KEY_ID": f"key-of-{ns}", "AWS_SECRET_ACCESS_KEY": "testing"}, namespace=ns)
    cluster.create({"apiVersion": API, "kind": "GovernancePolicy", "metadata": {"name": "federations"},
                    "spec": {"namespaces": [COORD], "required": ["evaluation", "provenance", "pii"]}})
    for site, ns in SITES[:2]:
        participant_dataset(cluster, bucket, site, ns)
    cluster.create(federation_manifest(bucket, f"s3://{bucket}/models/tiny"))

    waiting = wait_for(lambda: (f := fed(cluster)).get("status", {}).get("phase") == "WaitingForDatasets" and f, 20)
    assert "team-east/notes does not exist" in waiting["status"]["message"]
    assert "finetune.dev/federation-cleanup" in waiting["metadata"]["finalizers"]
    participant_dataset(cluster, bucket, "east", "team-east")  # the last site's Dataset appears: it starts

    # The objects, where they belong.
    wait_for(lambda: cluster.get("batch/v1", "jobs", "team-east", f"{COORD}-triage-site-east"), 20, "site Jobs")
    server = cluster.get("batch/v1", "jobs", COORD, "triage-server")
    assert server["spec"]["template"]["spec"]["serviceAccountName"] == "triage-federation"
    assert cluster.get("v1", "services", COORD, "triage-superlink")["spec"]["ports"][0]["port"] == 9092
    for site, ns in SITES:
        job = cluster.get("batch/v1", "jobs", ns, f"{COORD}-triage-site-{site}")
        assert "ownerReferences" not in job["metadata"]
        assert job["metadata"]["labels"]["finetune.dev/federation"] == f"{COORD}.triage"
        assert cluster.get("v1", "serviceaccounts", ns, f"{COORD}-triage-site")
        assert cluster.get("networking.k8s.io/v1", "networkpolicies", ns, f"{COORD}-triage-site")

    training = wait_for(lambda: (f := fed(cluster)).get("status", {}).get("phase") == "Training" and f, 30, "Training")
    assert training["status"]["currentRound"] >= 1

    done = wait_for(lambda: (f := fed(cluster)).get("status", {}).get("phase") in ("Succeeded", "Failed") and f, 60,
                    "the federation finished")
    status = done["status"]
    assert status["phase"] == "Succeeded", (status, kubelet.log("triage-server"))
    assert status["currentRound"] == 3 and [r["sitesReported"] for r in status["rounds"]] == [3, 2, 3]
    assert status["privacy"]["secureAggregation"] is True  # three sites: SecAgg+ on by default
    assert status["adapter"]["digest"].startswith("sha256:")
    checks = {c["name"]: c["passed"] for c in status["governance"]["checks"]}
    assert checks == {"evaluation": True, "provenance": True, "pii": True}, status["governance"]
    alias = json.loads(storage.read_text(status["promotion"]["aliasURI"]))
    assert alias["adapterDigest"] == status["adapter"]["digest"]
    assert [s["name"] for s in alias["federation"]["sites"]] == ["north", "south", "east"]
    for type_ in ("DatasetsReady", "Trained", "GovernancePassed", "Promoted", "Ready"):
        assert get_condition(status["conditions"], type_)["status"] == "True", type_
    assert all(c["observedGeneration"] == done["metadata"]["generation"] for c in status["conditions"])
    # The rounds are over: the SuperLink's Job is gone.
    wait_for(lambda: cluster.get("batch/v1", "jobs", COORD, "triage-superlink") is None, 20, "SuperLink deleted")

    # Each site read its own namespace's Dataset with its own namespace's credentials.
    for site, ns in SITES:
        seen = json.loads(storage.read_text(f"s3://{bucket}/store/federations/{ns}/{COORD}/triage/{site}/seen.json"))
        assert seen["data"] == f"s3://{bucket}/{ns}/validated/notes" and seen["rows"] > 0
        assert seen["key"] == f"key-of-{ns}" and seen["superlink"].endswith(":9092")
    reasons = wait_for(lambda: {e["reason"] for e in cluster.events(COORD, "triage")} >= {"SiteDropout", "Promoted"}
                       and cluster.events(COORD, "triage"), 10, "Events")
    dropout = next(e for e in reasons if e["reason"] == "SiteDropout")
    assert "round 2" in dropout["message"] and "east" in dropout["message"]
    assert "key-of-" not in json.dumps(status) + json.dumps(reasons)  # no credential in status or Events

    # Deleting the federation deletes what it made in the participants' namespaces.
    cluster.delete(API, "federatedfinetunejobs", COORD, "triage")
    wait_for(lambda: not fed(cluster), 20, "the finalizer released the object")
    for site, ns in SITES:
        assert cluster.get("batch/v1", "jobs", ns, f"{COORD}-triage-site-{site}") is None
        assert cluster.get("v1", "configmaps", ns, f"{COORD}-triage-site-{site}") is None
        assert cluster.get("v1", "serviceaccounts", ns, f"{COORD}-triage-site") is None
        assert cluster.get("networking.k8s.io/v1", "networkpolicies", ns, f"{COORD}-triage-site") is None

"""The kstatus conditions on the real API server: every status the decisions produce for a Dataset
and a FineTuneJob is accepted by the CRD's status schema, and what a GitOps tool reads back from
the server (kubectl wait, kstatus, the chart's Argo CD Lua) is what the unit tests promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_operator import kstatus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared status paths
import gitops_statuses as paths  # noqa: E402
from test_kstatus import EXPECTED as KSTATUS  # noqa: E402

SPECS = {"Dataset": {"source": {"uri": "s3://bucket/raw.jsonl"}, "format": "chat",
                     "provenance": {"origin": "test", "license": "CC0-1.0"}},
         "FineTuneJob": {"baseModel": {"uri": "s3://models/tiny"}, "datasetRef": {"name": "ds"},
                         "output": {"uri": "s3://out/j"}, "resources": {"gpusPerNode": 1}},
         "SyntheticDataset": {"seed": {"dataset": "seed"}, "generator": {"fineTuneJob": "gen"}, "examples": 20},
         "FederatedFineTuneJob": {"baseModel": {"uri": "s3://models/tiny"}, "output": {"uri": "s3://out/f"},
                                  "participants": [{"name": "north", "namespace": "team-north", "dataset": "ds"},
                                                   {"name": "south", "namespace": "team-south", "dataset": "ds"}]}}


def _as_written(stored, written) -> bool:
    """`stored` is `written` plus defaulted fields (0, "", {}, []) at any depth."""
    if isinstance(written, dict) and isinstance(stored, dict):
        return (all(k in stored and _as_written(stored[k], v) for k, v in written.items())
                and all(v in (0, "", {}, []) for k, v in stored.items() if k not in written))
    if isinstance(written, list) and isinstance(stored, list):
        return len(written) == len(stored) and all(map(_as_written, stored, written))
    return stored == written


def _set_status(cluster, kind: str, name: str, namespace: str, status: dict) -> dict:
    cluster.kubectl("patch", kind.lower(), name, "-n", namespace, "--subresource=status", "--type=json",
                    "-p", json.dumps([{"op": "add", "path": "/status", "value": status}]))
    return cluster.get(kind.lower(), name, namespace)


def test_decision_statuses_round_trip_through_the_api_server_with_their_gitops_verdicts(real_cluster, crds, namespace):
    pytest.importorskip("lupa.lua51")
    for kind, spec in SPECS.items():
        real_cluster.apply({"apiVersion": "finetune.dev/v1alpha1", "kind": kind,
                            "metadata": {"name": "gitops", "namespace": namespace}, "spec": spec})
    checked = 0
    for name, obj in paths.all_paths().items():
        if obj["metadata"]["generation"] != 1:
            continue  # a live object's generation is 1 here; the stale cases are unit-tested
        kind = obj["kind"]
        live = _set_status(real_cluster, kind, "gitops", namespace, obj["status"])
        # Stored as written; the server only adds its schema defaults (observedGeneration 0, {} and []).
        assert _as_written(live["status"], obj["status"]), name
        assert kstatus.compute(live)[0] == KSTATUS[name][0], name
        assert paths.run_health(kind, live) == paths.run_health(kind, obj), name
        checked += 1
    assert checked >= 19

    # kubectl wait, the way a pipeline waits for a promotion.
    _set_status(real_cluster, "FineTuneJob", "gitops", namespace, paths.finetunejob_paths()["succeeded"]["status"])
    real_cluster.kubectl("wait", "finetunejob/gitops", "-n", namespace, "--for=condition=Ready", "--timeout=20s")
    _set_status(real_cluster, "FineTuneJob", "gitops", namespace,
                paths.finetunejob_paths()["awaiting-approval"]["status"])
    waiting = real_cluster.kubectl("wait", "finetunejob/gitops", "-n", namespace, "--for=condition=Ready",
                                   "--timeout=2s", check=False)
    assert waiting.returncode != 0
    real_cluster.kubectl("wait", "finetunejob/gitops", "-n", namespace, "--for=condition=Stalled=False",
                         "--timeout=20s")
    _set_status(real_cluster, "FineTuneJob", "gitops", namespace,
                paths.finetunejob_paths()["governance-blocked"]["status"])
    real_cluster.kubectl("wait", "finetunejob/gitops", "-n", namespace, "--for=condition=Stalled", "--timeout=20s")


def test_the_charts_argocd_health_configmap_is_accepted_by_the_api_server(real_cluster, namespace):
    repo = paths.REPO
    subprocess.run(["bash", str(repo / "hack" / "get-helm.sh")], check=True, capture_output=True, timeout=300)
    out = subprocess.run([str(repo / "hack" / "bin" / "helm"), "template", "ft", str(paths.CHART),
                          "--set", "trainer.image=ghcr.io/example/trainer:1",
                          "--set", "argocd.healthChecks.enabled=true", "--set", f"argocd.healthChecks.namespace={namespace}",
                          "--show-only", "templates/argocd-health.yaml"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    real_cluster.apply(out)
    cm = real_cluster.get("configmap", "ft-finetune-operator-argocd-health", namespace)
    assert sorted(cm["data"]) == sorted(f"resource.customizations.health.finetune.dev_{k}"
                                        for k in ("Dataset", "FineTuneJob", "GovernancePolicy", "SyntheticDataset",
                                                  "FederatedFineTuneJob"))
    assert cm["data"]["resource.customizations.health.finetune.dev_FineTuneJob"] == paths.health_lua("FineTuneJob")
    assert yaml.safe_load(out)["kind"] == "ConfigMap"

"""Two replicas with Kopf peering: only one acts; when it dies, the other takes over.

Each replica is a real `finetune-operator run` process (peering on, as the Helm chart runs it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import kmock
from operator_e2e import finetunejob_manifest, phase, ready_dataset
from kube_emulator import wait_for


def start_replica(env: dict, priority: int, log: Path) -> subprocess.Popen:
    replica_env = {**os.environ, **env, "FINETUNE_PEERING_PRIORITY": str(priority),
                   "FINETUNE_PEERING_LIFETIME": "6", "FINETUNE_PEERING_NAME": "finetune-operator"}
    return subprocess.Popen([sys.executable, "-m", "finetune_operator", "run"], env=replica_env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def trainer_job_posts(cluster) -> list[str]:
    return [r.data["metadata"]["name"] for r in cluster.write_requests()
            if r.method == "POST" and str(r.url.path).endswith("/jobs")]


def test_only_the_leader_acts_and_a_standby_takes_over(cluster, env, tmp_path):
    cluster.emulator.resources["kopf.dev/v1/clusterkopfpeerings"] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs={"get", "list", "watch", "patch", "create"})
    cluster.request("POST", "/apis/kopf.dev/v1/clusterkopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "finetune-operator"}})
    ready_dataset(cluster, env["bucket"])
    leader = start_replica(env, 200, tmp_path / "leader.log")
    standby = start_replica(env, 100, tmp_path / "standby.log")
    try:
        # Both replicas have registered in the peering object: the lower priority one stays paused.
        wait_for(lambda: len((cluster.get("kopf.dev/v1", "clusterkopfpeerings", None, "finetune-operator")
                              or {}).get("status") or {}) == 2, 30, "two peers")
        cluster.create(finetunejob_manifest("ha-1", "ready", "s3://x/m", f"s3://{env['bucket']}/runs/ha-1"))
        first = wait_for(lambda: cluster.get("batch/v1", "jobs", "default", "ha-1-train-1"), 30,
                         "leader creates the Job")
        # The status comes last (after the Job and its ConfigMap): kill the leader once it is done, or
        # the standby finishes the reconcile (adopting the Job: a second POST, answered 409).
        wait_for(lambda: phase(cluster, "ha-1") == "Queued", 30, "leader records the Job")
        assert trainer_job_posts(cluster) == ["ha-1-train-1"]  # one POST: the standby did nothing

        leader.send_signal(signal.SIGKILL)  # no goodbye: the standby must notice the silence
        leader.wait(10)
        cluster.create(finetunejob_manifest("ha-2", "ready", "s3://x/m", f"s3://{env['bucket']}/runs/ha-2"))
        wait_for(lambda: cluster.get("batch/v1", "jobs", "default", "ha-2-train-1"), 60, "standby takes over")
        wait_for(lambda: phase(cluster, "ha-2") == "Queued", 30, "standby records the Job")
        posts = trainer_job_posts(cluster)
        # On taking over, the standby may reconcile ha-1 before its Job watch has caught up (Kopf's
        # index barrier covers the operator's first start, not a resume after a peering pause): it
        # POSTs ha-1-train-1 again, gets 409 and adopts it. Never a second Job.
        assert sorted(set(posts)) == ["ha-1-train-1", "ha-2-train-1"] and posts.count("ha-2-train-1") == 1
        assert sorted(j["metadata"]["name"] for j in cluster.list("batch/v1", "jobs", "default")) == \
            ["ha-1-train-1", "ha-2-train-1"]
        assert cluster.get("batch/v1", "jobs", "default", "ha-1-train-1")["metadata"]["uid"] == first["metadata"]["uid"]
    finally:
        for proc in (leader, standby):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(20)

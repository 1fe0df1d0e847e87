"""Multi-node trainers on the REAL control plane (issue 13).

1. The rendered gang for `nodes: 2, gpusPerNode: 4` (Indexed Job, headless Service, per-gang
   NetworkPolicy) is accepted by the real API server as rendered: completion mode, parallelism,
   pod failure policy, subdomain, the PET_* environment with the completion-index fieldRef, the
   rendezvous DNS name and port, the Kueue label. Unsuspended, the real Job controller gives pod i
   the hostname <job>-i and the completion-index annotation PET_NODE_RANK reads.
2. With fakenode, two pods (two torchrun "nodes", one gloo rank each, CPU) train the tiny model to
   completion. fakenode runs pods as local processes sharing 127.0.0.1 and has no cluster DNS, so
   the operator runs with FINETUNE_RENDEZVOUS_HOST=127.0.0.1 (config.rendezvous_host) instead of
   pod 0's DNS name; the rendezvous port is a free one, since every pod shares the host network.
"""

from __future__ import annotations

import pytest

from realcluster import operator_harness as h
from realcluster.realk8s import wait_for

from finetune_operator import children, gang
from finetune_operator.config import OperatorConfig
from testutil import free_port

CFG = OperatorConfig(trainer_image="ghcr.io/finetune-operator/trainer:realcluster", s3_endpoint="http://127.0.0.1:9")


def test_gang_of_two_nodes_with_four_gpus_is_accepted_as_rendered(real_cluster, crds, namespace):
    c = real_cluster
    c.apply({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
             "metadata": {"name": "big", "namespace": namespace},
             "spec": {"baseModel": {"uri": "s3://models/llama"}, "datasetRef": {"name": "ds"},
                      "output": {"uri": "s3://out/big"}, "suspend": True,
                      "resources": {"nodes": 2, "gpusPerNode": 4, "queueName": "team-queue"}}})
    ftj = c.get("finetunejob", "big", namespace)  # with the API server's defaults (distributed.strategy: auto)
    assert ftj["spec"]["distributed"] == {"strategy": "auto", "rendezvousPort": 29500}
    train_cfg = children.trainer_config(ftj, "s3://data/v", "chat", None, 15)
    cm, job = children.trainer_children(ftj, 1, train_cfg, CFG)
    job["spec"]["suspend"] = True  # nothing runs: this test is about what the API server keeps
    extra = gang.gang_objects(job, ftj, CFG)
    c.apply([cm, *extra, job])

    got = c.get("job", "big-train-1", namespace)
    spec = got["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 6
    rules = spec["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob", "Ignore", "Ignore"]
    assert rules[2]["onExitCodes"]["values"] == [5]
    assert got["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "big-train-1"
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["PET_NNODES"]["value"] == "2" and env["PET_NPROC_PER_NODE"]["value"] == "4"
    assert env["PET_MASTER_ADDR"]["value"] == f"big-train-1-0.big-train-1.{namespace}.svc"
    assert env["PET_MASTER_PORT"]["value"] == "29500"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["rendezvous"] == 29500
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"

    svc = c.get("service", "big-train-1", namespace)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]
    policy = c.get("networkpolicy", "big-train-1-gang", namespace)
    assert policy["spec"]["podSelector"]["matchLabels"] == svc["spec"]["selector"]

    # Unsuspended, the Job controller makes pod i with hostname <job>-i and the index annotation
    # (the scheduler binds both to gpu-node-1, which has 8 GPUs; their command fails without a
    # trainer config, which does not matter here).
    c.kubectl("patch", "job", "big-train-1", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    pods = wait_for(lambda: len(p := h.pods(c, namespace, "big-train-1")) >= 2 and p, timeout=60,
                    what="two indexed pods")
    by_index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert by_index["0"]["spec"]["hostname"] == "big-train-1-0"
    assert by_index["1"]["spec"]["hostname"] == "big-train-1-1"
    assert all(p["spec"]["subdomain"] == "big-train-1" for p in pods)
    assert svc["spec"]["selector"].items() <= by_index["0"]["metadata"]["labels"].items()
    c.kubectl("delete", "job", "big-train-1", "-n", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def stack(fakenode, crds, s3_server, tiny_model_dir, tmp_path_factory):
    with h.operator_stack(fakenode, s3_server, tiny_model_dir, tmp_path_factory.mktemp("operator"),
                          FINETUNE_RENDEZVOUS_HOST="127.0.0.1") as st:
        yield st


def test_two_fakenode_pods_train_one_gloo_job_to_completion(stack):
    c = stack.cluster
    ns = h.new_namespace(c, stack.prefix)
    try:
        h.ready_dataset(c, stack.bucket, ns)
        output = f"s3://{stack.bucket}/runs/{ns}/gang"
        c.apply(h.finetunejob_manifest("gang", ns, "ready", stack.model_uri, output,
                                       training={"maxSteps": 4, "checkpointEverySteps": 2},
                                       resources={"nodes": 2, "gpusPerNode": 1},
                                       distributed={"strategy": "ddp", "rendezvousPort": free_port()}))
        done = h.wait_phase(c, ns, "gang", ("Succeeded", "Failed"), 300, stack.op)
        assert done["phase"] == "Succeeded", (done, stack.op.logs()[-3000:])
        job = c.get("job", "gang-train-1", ns)
        assert job["spec"]["completionMode"] == "Indexed" and job["status"]["succeeded"] == 2
        logs = [h.pod_logs(c, ns, p["metadata"]["name"]) for p in h.pods(c, ns, "gang-train-1")]
        assert len(logs) == 2 and all('"world_size": 2' in text for text in logs), logs
        # rank 0 (pod 0) published the adapter; both pods' ranks trained the same 4 steps
        assert done["progress"]["totalSteps"] == 4 and done["adapter"]["digest"].startswith("sha256:")
    finally:
        h.delete_namespace(c, ns)

"""Multi-GPU and multi-node trainer Jobs: torchrun's settings, the Indexed Job, its headless Service
and NetworkPolicy, the Kueue label on the one Job, and GPU-hours for the GPUs the pods held."""

from __future__ import annotations

import json

from finetune_operator import children, decisions, gang
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.config import OperatorConfig

CFG = OperatorConfig(trainer_image="registry.example/trainer:1", s3_endpoint="http://s3.local:9000",
                     artifact_store="s3://store", default_governance={"required": []})


def ftj(status=None, **spec) -> dict:
    base = {"baseModel": {"uri": "s3://models/tiny"}, "datasetRef": {"name": "ds"}, "output": {"uri": "s3://out/r"}}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "llama", "namespace": "team", "uid": "uid-1", "generation": 1},
            "spec": {**base, **spec}, "status": status or {}}


def rendered(obj: dict, config: OperatorConfig = CFG) -> tuple[dict, dict]:
    cfg = children.trainer_config(obj, "s3://data/v", "chat", None, 15)
    return children.trainer_children(obj, 1, cfg, config)


def env_of(job: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_two_nodes_of_four_gpus_is_an_indexed_job_with_torchrun_settings():
    obj = ftj(resources={"nodes": 2, "gpusPerNode": 4, "queueName": "team-queue"}, backoffLimit=3,
              distributed={"strategy": "fsdp"})
    cm, job = rendered(obj)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "llama-train-1"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    env = env_of(job)
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "4"
    # rank from the completion index; rendezvous at pod 0's stable DNS name
    assert env["PET_NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["PET_MASTER_ADDR"] == "llama-train-1-0.llama-train-1.team.svc"
    assert env["PET_MASTER_PORT"] == "29500"
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) == CFG.termination_grace_seconds - 10
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert ports == {"metrics": 9400, "rendezvous": 29500}
    # the whole gang is one Job, so one Kueue Workload
    assert job["metadata"]["labels"][children.KUEUE_QUEUE] == "team-queue"
    # a gang restart may cost one failed pod per node; a preempted rank (exit 5) or an evicted pod costs nothing
    assert spec["backoffLimit"] == 6
    actions = [(r["action"], r.get("onExitCodes", {}).get("values")) for r in spec["podFailurePolicy"]["rules"]]
    assert actions == [("FailJob", [3]), ("Ignore", None), ("Ignore", [5])]
    assert json.loads(cm["data"]["job.json"])["distributed"] == {"strategy": "fsdp"}  # reaches the trainer


def test_the_gang_gets_a_headless_service_and_a_policy_between_its_own_pods():
    obj = ftj(resources={"nodes": 2, "gpusPerNode": 4})
    _, job = rendered(obj)
    svc, policy = gang.gang_objects(job, obj, CFG)
    assert svc["kind"] == "Service" and svc["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["selector"][children.ATTEMPT_LABEL] == "1"  # only this attempt's pods
    assert svc["spec"]["ports"][0]["port"] == 29500
    assert policy["kind"] == "NetworkPolicy" and policy["metadata"]["name"] == "llama-train-1-gang"
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector == svc["spec"]["selector"]
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": selector}}]
    assert policy["spec"]["egress"][0]["to"] == [{"podSelector": {"matchLabels": selector}}]
    for obj_ in (svc, policy):  # garbage-collected with the FineTuneJob
        assert obj_["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    # a config without Job NetworkPolicies gets only the Service
    no_policy = OperatorConfig(**{**CFG.__dict__, "job_network_policy": False})
    assert [o["kind"] for o in gang.gang_objects(job, obj, no_policy)] == ["Service"]


def test_one_pod_of_many_gpus_runs_torchrun_ranks_without_an_indexed_job():
    obj = ftj(resources={"gpusPerNode": 8})
    _, job = rendered(obj)
    env = env_of(job)
    assert env["PET_NPROC_PER_NODE"] == "8" and env["PET_NNODES"] == "1"
    assert "PET_MASTER_ADDR" not in env and "completionMode" not in job["spec"]
    assert gang.gang_objects(job, obj, CFG) == []
    _, single = rendered(ftj(resources={"gpusPerNode": 1}))
    assert not any(k.startswith("PET_") for k in env_of(single))


def test_rendezvous_host_override_for_clusters_without_pod_dns():
    cfg = OperatorConfig(**{**CFG.__dict__, "rendezvous_host": "127.0.0.1"})
    _, job = rendered(ftj(resources={"nodes": 2, "gpusPerNode": 1}, distributed={"rendezvousPort": 29611}), cfg)
    env = env_of(job)
    assert env["PET_MASTER_ADDR"] == "127.0.0.1" and env["PET_MASTER_PORT"] == "29611"


def test_a_name_starting_with_a_digit_still_gets_a_valid_service_name():
    assert gang.service_name("7b-train-1") == "t7b-train-1"


def test_the_plan_creates_service_policy_and_job_for_a_gang():
    dataset = {"metadata": {"name": "ds", "generation": 1}, "spec": {"format": "chat"},
               "status": {"phase": "Ready", "observedGeneration": 1, "validatedURI": "s3://v", "digest": "sha256:1"}}
    plan = decisions.plan_finetunejob(ftj(resources={"nodes": 2, "gpusPerNode": 4}),
                                      decisions.JobInputs(dataset=dataset), CFG, "2026-01-01T00:00:00Z")
    assert [m["kind"] for m in plan.create] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]


def test_gpu_hours_count_the_gpus_the_pods_held():
    start, now = "2026-01-01T00:00:00Z", "2026-01-01T00:30:00Z"
    obj = ftj(resources={"nodes": 2, "gpusPerNode": 4})
    gang_job = decisions.summarize_job({"metadata": {"name": "j"}, "spec": {"parallelism": 2},
                                        "status": {"startTime": start}})
    assert decisions.gpu_hours(obj, gang_job, now) == 4.0  # 2 pods x 4 GPUs x 0.5 h
    # A Job with one pod never counts `nodes` pods (the over-reporting before multi-node Jobs existed).
    plain = decisions.summarize_job({"metadata": {"name": "j"}, "spec": {}, "status": {"startTime": start}})
    assert decisions.gpu_hours(obj, plain, now) == 2.0


def test_the_strategy_is_part_of_the_api():
    spec = FineTuneJobSpec.model_validate({**ftj()["spec"], "distributed": {"strategy": "fsdp"}})
    assert spec.distributed.strategy == "fsdp"
    try:
        FineTuneJobSpec.model_validate({**ftj()["spec"], "distributed": {"strategy": "tp"}})
    except ValueError as exc:
        assert "distributed.strategy" in str(exc).replace("\n", " ").replace(" ", ".") or "strategy" in str(exc)
    else:
        raise AssertionError("an unknown strategy was accepted")


def test_the_operator_client_can_address_every_object_the_plan_creates():
    """kube.path_of knows each kind the operator creates: one it cannot address fails every reconcile
    (found on the real control plane: a gang's Service)."""
    from finetune_operator import kube

    dataset = {"metadata": {"name": "ds", "generation": 1}, "spec": {"format": "chat"},
               "status": {"phase": "Ready", "observedGeneration": 1, "validatedURI": "s3://v", "digest": "sha256:1"}}
    plan = decisions.plan_finetunejob(ftj(resources={"nodes": 2, "gpusPerNode": 4}),
                                      decisions.JobInputs(dataset=dataset), CFG, "2026-01-01T00:00:00Z")
    plurals = {"ConfigMap": "configmaps", "Service": "services", "NetworkPolicy": "networkpolicies", "Job": "jobs"}
    for manifest in plan.create:
        path = kube.path_of(manifest["apiVersion"], manifest["kind"], "team", manifest["metadata"]["name"])
        assert path.endswith(f"/namespaces/team/{plurals[manifest['kind']]}/{manifest['metadata']['name']}")

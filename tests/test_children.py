"""The manifests the operator creates: names, ownership, scheduling, security, credentials."""

from __future__ import annotations

import json

from finetune_operator import children
from finetune_operator.config import OperatorConfig, load

CFG = OperatorConfig(trainer_image="registry.example/trainer:1", s3_endpoint="http://s3.local:9000",
                     s3_credentials_secret="s3-default", artifact_store="s3://artifacts/store",
                     gpu_node_selector={"pool": "gpu"})


def ftj(**spec) -> dict:
    base = {"baseModel": {"uri": "s3://models/tiny"}, "datasetRef": {"name": "ds"},
            "output": {"uri": "s3://out/run1"}}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "job1", "namespace": "team", "uid": "uid-1", "generation": 1},
            "spec": {**base, **spec}}


def trainer(obj: dict, attempt: int = 1) -> tuple[dict, dict]:
    cfg = children.trainer_config(obj, "s3://data/v", "chat", "sha256:" + "0" * 64, 15)
    return children.trainer_children(obj, attempt, cfg, CFG)


def test_gpu_job_has_scheduling_fields_queue_label_and_owner():
    obj = ftj(resources={"gpusPerNode": 2, "queueName": "team-queue", "priorityClassName": "training",
                         "affinity": {"nodeAffinity": {"x": 1}}, "gpuNodeSelector": {"gpu": "h100"}})
    cm, job = trainer(obj)
    assert job["metadata"]["name"] == cm["metadata"]["name"] == "job1-train-1"
    assert job["metadata"]["labels"][children.KUEUE_QUEUE] == "team-queue"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert cm["metadata"]["ownerReferences"][0]["controller"] is True
    pod = job["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"pool": "gpu", "gpu": "h100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "training" and pod["affinity"] == {"nodeAffinity": {"x": 1}}


def test_cpu_job_requests_no_gpu_and_no_gpu_tolerations():
    _, job = trainer(ftj(resources={"gpusPerNode": 0, "cpu": "2", "memory": "4Gi"}))
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert "tolerations" not in pod and "nodeSelector" not in pod


def test_pod_failure_policy_backoff_deadline():
    _, job = trainer(ftj(backoffLimit=5, activeDeadlineSeconds=3600))
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [3]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # A SIGTERMed trainer checkpoints and exits 5: a new pod resumes, without spending the backoffLimit.
    assert rules[2] == {"action": "Ignore", "onExitCodes": {"containerName": "main", "operator": "In", "values": [5]}}
    assert job["spec"]["backoffLimit"] == 5 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_restricted_security_context_and_writable_emptydirs():
    _, job = trainer(ftj())
    pod = job["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["runAsNonRoot"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/cache", "/dev/shm", children.CONFIG_DIR} <= mounts
    sizes = {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v}
    assert sizes == {"tmp": {"sizeLimit": "20Gi"}, "cache": {"sizeLimit": "200Gi"},
                     "dshm": {"medium": "Memory", "sizeLimit": "8Gi"}}  # every emptyDir is bounded
    # No pod talks to the API server: no token to steal; the trainer has time to checkpoint on SIGTERM.
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] == 300


def test_job_pod_limits_come_from_the_configuration():
    cfg = OperatorConfig(tmp_size_limit="1Gi", shm_size_limit="256Mi", termination_grace_seconds=45)
    _, job = children.trainer_children(ftj(), 1, children.trainer_config(ftj(), "s3://d", "chat", None, 15), cfg)
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}} in pod["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}} in pod["volumes"]


def test_governance_job_runs_the_platform_image_in_the_operator_namespace():
    cfg = OperatorConfig(trainer_image="platform/trainer:1", namespace="ft-system", s3_credentials_secret="ops-s3",
                         signing_secret="ft-signing")
    hostile = ftj(image="attacker/image:latest", output={"uri": "s3://out/run1", "credentials": {"name": "team-s3"}},
                  resources={"gpusPerNode": 4, "queueName": "team-queue", "priorityClassName": "high"})
    hostile["metadata"]["uid"] = "uid-1"
    gov_cfg = {"job": {"name": "job1"}, "governanceInputs": {"run": 1}}
    (job,) = children.governance_children(hostile, "team-job1-gov-x", gov_cfg, cfg)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["metadata"]["namespace"] == "ft-system" and "ownerReferences" not in job["metadata"]
    assert job["metadata"]["labels"][children.JOB_NAMESPACE_LABEL] == hostile["metadata"]["namespace"]
    assert job["metadata"]["labels"][children.JOB_UID_LABEL] == "uid-1"
    assert container["image"] == "platform/trainer:1"  # never spec.image
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secrets == {"ops-s3"}  # the platform's credentials, in the operator's namespace
    signing = next(v for v in pod["volumes"] if v["name"] == "signing")
    assert signing["secret"]["secretName"] == "ft-signing"
    assert signing["secret"]["items"] == [{"key": "signing.key", "path": "signing.key"}]
    assert {"name": "FINETUNE_SIGNING_KEYS", "value": children.SIGNING_DIR} in container["env"]
    # The config travels in the Job itself (no ConfigMap to leave behind in the operator's namespace).
    annotation = job["spec"]["template"]["metadata"]["annotations"][children.CONFIG_ANNOTATION]
    assert json.loads(annotation) == gov_cfg
    assert pod["automountServiceAccountToken"] is False
    assert pod.get("priorityClassName") == "high" and children.KUEUE_QUEUE not in job["metadata"]["labels"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["spec"]["ttlSecondsAfterFinished"] == children.GOVERNANCE_TTL_SECONDS


def test_governance_job_names_differ_between_namespaces():
    a = children.governance_job_name("job", "sha256:a", "sha256:p", 1, "team-a")
    b = children.governance_job_name("job", "sha256:a", "sha256:p", 1, "team-b")
    long = children.governance_job_name("j" * 63, "sha256:a", "sha256:p", 1, "n" * 63)
    assert a != b and len(long) <= 63


def test_job_network_policy_allows_dns_and_the_object_store_only():
    policy = children.job_network_policy("team", OperatorConfig(s3_endpoint="http://minio.storage:9000"))
    spec = policy["spec"]
    assert policy["metadata"]["name"] == children.JOB_NETWORK_POLICY and spec["policyTypes"] == ["Ingress", "Egress"]
    ports = [p for rule in spec["egress"] for p in rule["ports"]]
    assert {(p["protocol"], p["port"]) for p in ports} == {("UDP", 53), ("TCP", 53), ("TCP", 9000)}
    assert all("to" not in rule for rule in spec["egress"])
    assert spec["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9400}]}]
    custom = children.job_network_policy("team", OperatorConfig(job_egress=(
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"protocol": "TCP", "port": 443}]},)))
    assert custom["spec"]["egress"][1]["to"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert children._s3_port(None) == 443 and children._s3_port("http://s3") == 80


def test_credentials_only_through_secret_key_ref():
    _, job = trainer(ftj(output={"uri": "s3://out/run1", "credentials": {"name": "team-s3"}}))
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    secret_env = [e for e in env if e["name"].startswith("AWS_") and e["name"] not in ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")]
    assert secret_env and all("value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "team-s3"
                              for e in secret_env)
    _, default = trainer(ftj())
    names = {e["valueFrom"]["secretKeyRef"]["name"] for e in default["spec"]["template"]["spec"]["containers"][0]["env"]
             if "valueFrom" in e}
    assert names == {"s3-default"}


def test_image_override_and_config_map_content():
    cm, job = trainer(ftj(image="my/trainer:dev", training={"maxSteps": 3}))
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "my/trainer:dev"
    cfg = json.loads(cm["data"]["job.json"])
    assert cfg["outputURI"] == "s3://out/run1" and cfg["training"] == {"maxSteps": 3}
    assert cfg["data"]["uri"] == "s3://data/v"
    from finetune_operator.api.trainer_config import TrainerConfig

    TrainerConfig.model_validate(cfg)  # what the trainer will parse


def test_long_names_are_shortened_deterministically():
    long = "a" * 80
    name = children.trainer_job_name(long, 12)
    assert len(name) <= 63 and name.endswith("-train-12") and name == children.trainer_job_name(long, 12)
    assert children.attempt_of(name) == 12 and children.attempt_of(None) == 0


def test_dataset_default_output_location():
    ds = {"metadata": {"name": "d", "namespace": "n", "generation": 3, "uid": "u"}, "kind": "Dataset",
          "apiVersion": "finetune.dev/v1alpha1", "spec": {"source": {"uri": "s3://b/x.jsonl"}, "format": "chat"}}
    assert children.dataset_output_uri(ds, CFG) == "s3://artifacts/store/datasets/n/d/3"
    cm, job = children.validation_children(ds, CFG)
    assert job["metadata"]["name"] == "d-validate-3"
    assert "nvidia.com/gpu" not in json.dumps(job)


def test_config_from_env_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainerImage: a/b:1\nnamespaces: [x, y]\ndefaultGovernance: {required: [evaluation]}\n")
    cfg = load({"FINETUNE_CONFIG": str(path), "FINETUNE_METRICS_PORT": "0", "FINETUNE_STANDALONE": "true"})
    assert cfg.trainer_image == "a/b:1" and cfg.namespaces == ("x", "y") and cfg.metrics_port == 0
    assert cfg.standalone and cfg.default_governance == {"required": ["evaluation"]}
    from finetune_operator.cli import kopf_args

    args = kopf_args(cfg)
    # The watched namespaces, and the operator's own (its governance Jobs run there).
    assert "--standalone" in args and [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == [
        "x", "y", "finetune-system"]
    peered = kopf_args(load({}))
    assert "--peering" in peered and int(peered[peered.index("--priority") + 1]) > 0
    fixed = kopf_args(load({"FINETUNE_PEERING_PRIORITY": "7"}))
    assert fixed[fixed.index("--priority") + 1] == "7"


def test_pod_template_shape_ignores_names_and_sees_what_admission_sees():
    def shape(name: str = "job1", namespace: str = "team", attempt: int = 1, **spec) -> str:
        obj = ftj(**spec)
        obj["metadata"].update(name=name, namespace=namespace, uid=f"uid-{name}")
        return children.pod_template_shape(trainer(obj, attempt)[1])

    same = shape()
    assert shape(name="another-job", attempt=2) == same  # Job and ConfigMap names, label values
    assert shape(namespace="other-team") != same  # admission (quota, policies) is per namespace
    assert shape(resources={"priorityClassName": "training"}) != same
    assert shape(resources={"gpusPerNode": 2}) != same
    assert shape(image="registry.example/other:2") != same

"""Manifests of the objects the operator owns: batch/v1 Jobs, their ConfigMaps, the Job NetworkPolicy.

Pure functions from (object, configuration) to dicts; nothing here talks to a cluster.
Names are deterministic so a restarted operator finds (adopts) what it created before.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

from finetune_trainer import storage

from .api.curation import MAX_EVAL_SETS, MAX_EVAL_SETS_USED
from .api.meta import API_VERSION
from .config import OperatorConfig

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR = "finetune-operator"
ROLE = "finetune.dev/role"  # validation | trainer | governance | synthesis | synthesis-finalize
DATASET_LABEL = "finetune.dev/dataset"
JOB_LABEL = "finetune.dev/finetunejob"
ATTEMPT_LABEL = "finetune.dev/attempt"
#: Governance Jobs run in the operator's namespace: these say whose FineTuneJob they judge.
JOB_NAMESPACE_LABEL = "finetune.dev/job-namespace"
JOB_UID_LABEL = "finetune.dev/job-uid"
#: The governance Job's rendered config travels in its pod template (a downward API volume), so the
#: Job is one object: no ConfigMap to own across namespaces, nothing left behind when it goes.
CONFIG_ANNOTATION = "finetune.dev/config"
SIGNING_DIR = "/var/run/finetune/signing"
JOB_NETWORK_POLICY = "finetune-job-pods"
#: Finished governance Jobs are garbage-collected after a day (the verdict is in the FineTuneJob's status
#: and the signed report in the bucket).
GOVERNANCE_TTL_SECONDS = 86400
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
CONFIG_DIR = "/etc/finetune"
CONTAINER = "main"
#: Exit codes of finetune_trainer.errors (the trainer image is not imported here on purpose:
#: these numbers are the contract, repeated in the trainer's errors module).
EXIT_CONFIG_ERROR = 3
EXIT_PREEMPTED = 5
#: Taints GPU node pools usually carry (GKE, EKS, AKS and the NVIDIA GPU operator).
GPU_TOLERATIONS = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
]


def child_name(base: str, suffix: str, limit: int = 63) -> str:
    """`base-suffix`, shortened with a hash when too long (Job names end up in pod labels: 63 chars)."""
    name = f"{base}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 2
    return f"{base[:keep].rstrip('-.')}-{digest}-{suffix}"


def trainer_job_name(name: str, attempt: int) -> str:
    return child_name(name, f"train-{attempt}")


def attempt_of(job_name: Optional[str]) -> int:
    """The attempt number in a trainer Job name (0 when there is none yet)."""
    if not job_name:
        return 0
    tail = job_name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def validation_job_name(name: str, generation: int) -> str:
    return child_name(name, f"validate-{generation}")


def governance_job_name(name: str, adapter_digest: str, policy_digest: str = "", run: int = 1,
                        namespace: str = "") -> str:
    """One governance Job per (job, adapter, effective policy, run): a policy change gets a new Job,
    and so does a return to an earlier policy (a new run number). Every namespace's governance Jobs
    share the operator's namespace, so the job's namespace is part of the name."""
    key = hashlib.sha256(f"{namespace}/{name}|{adapter_digest}|{policy_digest}|{run}".encode()).hexdigest()[:10]
    return child_name(f"{namespace}-{name}" if namespace else name, f"gov-{key}")


def owner_reference(obj: dict) -> dict:
    meta = obj["metadata"]
    return {"apiVersion": obj.get("apiVersion", API_VERSION), "kind": obj["kind"], "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def dataset_output_uri(dataset: dict, config: OperatorConfig) -> str:
    """spec.output.uri, or {artifact store}/datasets/<ns>/<name>/<generation>."""
    meta = dataset["metadata"]
    output = (dataset.get("spec") or {}).get("output") or {}
    if output.get("uri"):
        return output["uri"].rstrip("/")
    if not config.artifact_store:
        raise ValueError("the Dataset has no spec.output.uri and the operator has no default artifact store")
    return storage.join(config.artifact_store, "datasets", meta.get("namespace", "default"), meta["name"],
                        str(meta.get("generation") or 1))


# --- rendered configs -----------------------------------------------------------------------

def validation_config(dataset: dict, output_uri: str, eval_set_uris: Sequence[str] = ()) -> dict:
    meta = dataset["metadata"]
    cfg = {"job": {"namespace": meta.get("namespace", "default"), "name": meta["name"], "uid": meta.get("uid")},
           "dataset": dataset["spec"], "outputURI": output_uri}
    if eval_set_uris and ((dataset["spec"].get("curation") or {}).get("decontamination") is not None):
        cfg["policyEvalSetURIs"] = list(eval_set_uris)[:MAX_EVAL_SETS]  # the first by policy name
    return cfg


def dataset_eval_sets(dataset: Optional[dict]) -> list[str]:
    """The evaluation files a Dataset's validation decontaminated against (its status), which the
    provenance check's re-validation must use too."""
    curation = (((dataset or {}).get("status") or {}).get("stats") or {}).get("curation") or {}
    return list(curation.get("evalSetURIs") or [])[:MAX_EVAL_SETS_USED]


def trainer_config(ftj: dict, data_uri: str, data_format: str, data_digest: Optional[str],
                   progress_interval: float, continual: Optional[dict] = None) -> dict:
    meta, spec = ftj["metadata"], ftj["spec"]
    cfg: dict[str, Any] = {
        "job": {"namespace": meta.get("namespace", "default"), "name": meta["name"], "uid": meta.get("uid")},
        "baseModel": spec["baseModel"],
        "data": {"uri": data_uri, "format": data_format, "digest": data_digest},
        "method": spec.get("method", "lora"),
        "outputURI": spec["output"]["uri"].rstrip("/"),
        "progressIntervalSeconds": min(progress_interval, 30.0),
        # The trainer pod's metrics endpoint; Prometheus scrapes it through the pod annotations.
        "metricsPort": 9400,
    }
    for key in ("lora", "quantization", "training", "multimodal", "distributed"):
        if spec.get(key) is not None:
            cfg[key] = spec[key]
    cfg.update(continual or {})  # initFrom, replayData: what lineage.continual_plan resolved
    return cfg


def governance_config(train_cfg: dict, policy: dict, dataset_spec: dict, pii_findings: dict,
                      adapter_uri: str, run: int = 1, report_uri: Optional[str] = None,
                      dataset_eval_set_uris: Sequence[str] = ()) -> dict:
    inputs = {"adapterURI": adapter_uri, "dataset": dataset_spec, "datasetPIIFindings": pii_findings or {},
              "baseModelDigest": train_cfg["baseModel"].get("digest"), "run": run}
    if dataset_eval_set_uris:
        inputs["datasetEvalSetURIs"] = list(dataset_eval_set_uris)
    if report_uri:
        inputs["reportURI"] = report_uri
    return {**train_cfg, "metricsPort": 0, "governance": policy, "governanceInputs": inputs}


# --- Kubernetes objects ---------------------------------------------------------------------

def config_map(name: str, namespace: str, owner: dict, labels: dict, filename: str, content: dict) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": labels,
                         "ownerReferences": [owner_reference(owner)]},
            "data": {filename: json.dumps(content, indent=1, sort_keys=True)}}


def credentials_env(secret_name: Optional[str]) -> list[dict]:
    """AWS credentials only through secretKeyRef: values never pass through the operator."""
    if not secret_name:
        return []

    def ref(key: str, optional: bool = False) -> dict:
        return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key, "optional": optional}}}

    return [ref("AWS_ACCESS_KEY_ID"), ref("AWS_SECRET_ACCESS_KEY"), ref("AWS_SESSION_TOKEN", optional=True)]


def _resources(cpu: Optional[str], memory: Optional[str], gpus: int, gpu_resource: str) -> dict:
    amounts: dict[str, Any] = {}
    if cpu:
        amounts["cpu"] = cpu
    if memory:
        amounts["memory"] = memory
    if gpus:
        amounts[gpu_resource] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def batch_job(*, name: str, namespace: str, owner: Optional[dict], labels: dict, command: list[str], image: str,
              config: OperatorConfig, secret: Optional[str], cpu: Optional[str] = None,
              memory: Optional[str] = None, gpus: int = 0, scheduling: Optional[dict] = None,
              backoff_limit: int = 0, deadline: Optional[int] = None, config_volume: Optional[dict] = None,
              extra_volumes: tuple = (), extra_mounts: tuple = (), extra_env: tuple = (),
              annotations: Optional[dict] = None) -> dict:
    """A batch/v1 Job running one finetune-trainer command with the restricted security profile.

    The root filesystem is read-only; /tmp, the model cache and /dev/shm are emptyDirs with a
    sizeLimit (PyTorch data loaders need a real /dev/shm). No pod talks to the Kubernetes API, so
    none gets a service-account token; each gets the grace period its checkpoint-on-SIGTERM needs.
    """
    scheduling = scheduling or {}
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/cache/huggingface"},
           {"name": "TMPDIR", "value": "/tmp"}, {"name": "AWS_DEFAULT_REGION", "value": config.s3_region}]
    if config.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": config.s3_endpoint})
    env += [{"name": k, "value": v} for k, v in sorted(config.job_env.items())]
    env += credentials_env(secret)
    env += list(extra_env)
    container = {
        "name": CONTAINER, "image": image, "imagePullPolicy": config.image_pull_policy,
        "command": command, "env": env,
        # The trainer writes its error to the termination message (else the log's tail is used): the
        # operator reads why a pod failed from the pod's status, without access to pod logs.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": _resources(cpu, memory, gpus, scheduling.get("gpuResourceName", "nvidia.com/gpu")),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *extra_mounts,
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": config.termination_grace_seconds,
        "containers": [container],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [
            {"name": "config", **(config_volume or {"configMap": {"name": name}})},
            {"name": "tmp", "emptyDir": {"sizeLimit": config.tmp_size_limit}},
            {"name": "cache", "emptyDir": {"sizeLimit": config.cache_size_limit}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size_limit}},
            *extra_volumes,
        ],
    }
    if config.job_service_account:
        pod_spec["serviceAccountName"] = config.job_service_account
    if gpus:
        selector = {**config.gpu_node_selector, **(scheduling.get("gpuNodeSelector") or {})}
        if selector:
            pod_spec["nodeSelector"] = selector
    tolerations = scheduling.get("tolerations")
    if tolerations is None and gpus:
        tolerations = GPU_TOLERATIONS
    if tolerations:
        pod_spec["tolerations"] = [{k: v for k, v in t.items() if v is not None} for t in tolerations]
    if scheduling.get("affinity"):
        pod_spec["affinity"] = scheduling["affinity"]
    if scheduling.get("priorityClassName"):
        pod_spec["priorityClassName"] = scheduling["priorityClassName"]

    job_labels = dict(labels)
    if scheduling.get("queueName"):
        job_labels[KUEUE_QUEUE] = scheduling["queueName"]
    spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "podFailurePolicy": {"rules": [
            # A configuration error will fail the same way on every retry.
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [EXIT_CONFIG_ERROR]}},
            # Evictions, preemptions and node drains are not the trainer's fault.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # SIGTERM (a deleted pod, a suspended Job, a drained node without the DisruptionTarget
            # condition): the trainer checkpointed and exited 5. Not a failure: the Job controller
            # makes a new pod, which resumes, without spending spec.backoffLimit.
            {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                 "values": [EXIT_PREEMPTED]}},
        ]},
        "template": {"metadata": {"labels": labels, **({"annotations": annotations} if annotations else {})},
                     "spec": pod_spec},
    }
    if deadline:
        spec["activeDeadlineSeconds"] = deadline
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": job_labels}
    if owner is not None:
        metadata["ownerReferences"] = [owner_reference(owner)]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def pod_template_shape(job: dict) -> str:
    """What admission sees of a Job's pod, minus what differs from one Job to the next (names: the
    ConfigMap volume, label values): jobs of one namespace with the same shape are admitted or
    refused alike, so the operator dry-runs one pod per shape instead of one per Job."""
    meta, template = job["metadata"], job["spec"]["template"]
    spec = dict(template["spec"])
    spec["volumes"] = [{**v, "configMap": {**v["configMap"], "name": ""}} if "configMap" in v else v
                       for v in spec.get("volumes") or []]
    labels = sorted(((template.get("metadata") or {}).get("labels") or {}))
    text = json.dumps([meta.get("namespace"), labels, spec], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def validation_children(dataset: dict, config: OperatorConfig, eval_set_uris: Sequence[str] = ()) -> tuple[dict, dict]:
    """The validation Job and its ConfigMap for the Dataset's current generation."""
    meta = dataset["metadata"]
    ns, generation = meta.get("namespace", "default"), meta.get("generation") or 1
    name = validation_job_name(meta["name"], generation)
    labels = {MANAGED_BY: OPERATOR, ROLE: "validation", DATASET_LABEL: meta["name"]}
    spec = dataset["spec"]
    secret = (((spec.get("output") or {}).get("credentials") or {}).get("name")
              or ((spec.get("source") or {}).get("credentials") or {}).get("name")
              or config.s3_credentials_secret)
    cfg = validation_config(dataset, dataset_output_uri(dataset, config), eval_set_uris)
    cm = config_map(name, ns, dataset, labels, "validation.json", cfg)
    job = batch_job(name=name, namespace=ns, owner=dataset, labels=labels, image=config.trainer_image,
                    command=["finetune-trainer", "validate", "--config", f"{CONFIG_DIR}/validation.json"],
                    config=config, secret=secret, cpu=config.validation_cpu, memory=config.validation_memory,
                    backoff_limit=2)
    return cm, job


def _job_secret(spec: dict, config: OperatorConfig) -> Optional[str]:
    # One set of AWS_* variables per container: the output's Secret, else the model's, else the default.
    return (((spec.get("output") or {}).get("credentials") or {}).get("name")
            or ((spec.get("baseModel") or {}).get("credentials") or {}).get("name")
            or config.s3_credentials_secret)


def trainer_children(ftj: dict, attempt: int, train_cfg: dict, config: OperatorConfig) -> tuple[dict, dict]:
    """The trainer Job (with its scheduling fields) and its ConfigMap for one attempt."""
    meta, spec = ftj["metadata"], ftj["spec"]
    ns = meta.get("namespace", "default")
    name = trainer_job_name(meta["name"], attempt)
    labels = {MANAGED_BY: OPERATOR, ROLE: "trainer", JOB_LABEL: meta["name"], ATTEMPT_LABEL: str(attempt)}
    res = spec.get("resources") or {}
    cm = config_map(name, ns, ftj, labels, "job.json", train_cfg)
    job = batch_job(name=name, namespace=ns, owner=ftj, labels=labels,
                    image=spec.get("image") or config.trainer_image,
                    command=["finetune-trainer", "train", "--config", f"{CONFIG_DIR}/job.json"],
                    config=config, secret=_job_secret(spec, config),
                    cpu=res.get("cpu") or config.default_cpu, memory=res.get("memory") or config.default_memory,
                    gpus=int(res.get("gpusPerNode", 1)), scheduling=res,
                    backoff_limit=int(spec.get("backoffLimit", 3)), deadline=spec.get("activeDeadlineSeconds"))
    if train_cfg.get("metricsPort"):
        # The Helm chart's PodMonitor scrapes trainer pods through this named port.
        job["spec"]["template"]["spec"]["containers"][0]["ports"] = [
            {"name": "metrics", "containerPort": train_cfg["metricsPort"], "protocol": "TCP"}]
    from . import gang  # torchrun's ranks, and the Indexed Job of a multi-node gang

    return cm, gang.apply(job, ftj, config)


def governance_children(ftj: dict, name: str, gov_cfg: dict, config: OperatorConfig) -> list[dict]:
    """The governance Job `name`, in the operator's namespace (GPU only if the trainer had one).

    It runs the platform's image (config.trainer_image, never spec.image: the user's image would
    write its own verdict) with the platform's S3 credentials and the signing key, in a namespace
    the FineTuneJob's owners cannot read. No owner reference (it cannot cross namespaces): the
    labels name the FineTuneJob, the operator deletes the Job with it, and a finished one expires.
    """
    meta, spec = ftj["metadata"], ftj["spec"]
    labels = {MANAGED_BY: OPERATOR, ROLE: "governance", JOB_LABEL: meta["name"],
              JOB_NAMESPACE_LABEL: meta.get("namespace", "default")}
    if meta.get("uid"):
        labels[JOB_UID_LABEL] = meta["uid"]
    res = dict(spec.get("resources") or {})
    res.pop("queueName", None)  # a LocalQueue belongs to the job's namespace, not the operator's
    gpus = min(int(res.get("gpusPerNode", 1)), 1)
    job = batch_job(
        name=name, namespace=config.namespace, owner=None, labels=labels, image=config.trainer_image,
        command=["finetune-trainer", "governance", "--config", f"{CONFIG_DIR}/job.json"],
        config=config, secret=config.s3_credentials_secret,
        cpu=res.get("cpu") or config.default_cpu, memory=res.get("memory") or config.default_memory,
        gpus=gpus, scheduling=res, backoff_limit=1,
        annotations={CONFIG_ANNOTATION: json.dumps(gov_cfg, indent=1, sort_keys=True)},
        config_volume={"downwardAPI": {"items": [
            {"path": "job.json", "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"}}]}},
        extra_volumes=({"name": "signing", "secret": {"secretName": config.signing_secret, "defaultMode": 0o440,
                                                       "items": [{"key": "signing.key", "path": "signing.key"}]}},),
        extra_mounts=({"name": "signing", "mountPath": SIGNING_DIR, "readOnly": True},),
        extra_env=({"name": "FINETUNE_SIGNING_KEYS", "value": SIGNING_DIR},))
    job["spec"]["ttlSecondsAfterFinished"] = GOVERNANCE_TTL_SECONDS
    return [job]


def _s3_port(endpoint: Optional[str]) -> int:
    loc = urlparse(endpoint or "")
    try:
        return loc.port or (80 if loc.scheme == "http" else 443)
    except ValueError:
        return 443


def job_network_policy(namespace: str, config: OperatorConfig, metrics_port: int = 9400) -> dict:
    """The NetworkPolicy of every Job pod the operator runs in `namespace`: ingress only to the
    trainer's metrics port (Prometheus), egress only to DNS and the object store (config.job_egress;
    by default the S3 endpoint's port at any address, as a NetworkPolicy cannot name a host).
    A pod running a user's image, or judging a hostile adapter, cannot reach the API server,
    cloud metadata or other services."""
    egress = [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]
    egress += [dict(rule) for rule in config.job_egress] or [
        {"ports": [{"protocol": "TCP", "port": _s3_port(config.s3_endpoint)}]}]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": JOB_NETWORK_POLICY, "namespace": namespace, "labels": {MANAGED_BY: OPERATOR}},
        "spec": {
            "podSelector": {"matchLabels": {MANAGED_BY: OPERATOR},
                            "matchExpressions": [{"key": ROLE, "operator": "Exists"}]},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": metrics_port}]}],
            "egress": egress,
        },
    }

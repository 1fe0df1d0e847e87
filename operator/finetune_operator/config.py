"""The operator's configuration: FINETUNE_* environment variables over an optional YAML file.

The Helm chart renders the YAML file (FINETUNE_CONFIG); single environment variables
override it, which is handy for local runs and tests. Nothing here holds a secret:
S3 credentials stay in a Secret whose *name* is configured and handed to Jobs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

import yaml

DEFAULT_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"


@dataclass(frozen=True)
class OperatorConfig:
    #: Namespaces to watch; empty means the whole cluster.
    namespaces: tuple[str, ...] = ()
    trainer_image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    #: Requests/limits of trainer pods when a FineTuneJob names none (cpu, memory).
    default_cpu: Optional[str] = None
    default_memory: Optional[str] = None
    #: Validation and governance Jobs need no GPU; these keep them small.
    validation_cpu: str = "1"
    validation_memory: str = "2Gi"
    s3_endpoint: Optional[str] = None
    s3_region: str = "us-east-1"
    #: Secret (in each object's namespace) with AWS_* keys, used when an object names none.
    s3_credentials_secret: Optional[str] = None
    #: Where Dataset outputs go when spec.output is unset: {store}/datasets/<ns>/<name>/<generation>/.
    artifact_store: Optional[str] = None
    #: Governance policy applied when no GovernancePolicy object matches (GovernanceSpec as a dict).
    default_governance: Optional[dict[str, Any]] = None
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    job_service_account: Optional[str] = None
    #: Seconds between progress refreshes while training (the issue asks for <= 30).
    progress_interval: float = 15.0
    metrics_port: int = 9300
    health_port: int = 8080
    peering_name: str = "finetune-operator"
    #: Kopf pauses every replica when two share a priority, so each replica needs its own:
    #: 0 (the default) picks a random one per start; the highest live replica acts.
    peering_priority: int = 0
    #: Seconds after which a silent replica counts as dead and a standby takes over.
    peering_lifetime: int = 60
    standalone: bool = False
    #: Extra environment for every Job container (non-secret settings only, e.g. HF_HUB_OFFLINE).
    job_env: dict[str, str] = field(default_factory=dict)
    #: The operator's own namespace (the chart sets it from the pod's): governance Jobs run here, with
    #: the signing key, out of reach of the namespaces whose adapters they judge.
    namespace: str = "finetune-system"
    #: Secret (in `namespace`) holding the report signing key (attestation.py); created on first start.
    signing_secret: str = "finetune-operator-signing"
    #: A local folder with signing.key / trusted.pem instead of the Secret (local runs, ftctl).
    signing_keys_dir: Optional[str] = None
    #: One NetworkPolicy per namespace for the Job pods: ingress only to the metrics port, egress only to
    #: DNS and `job_egress` (NetworkPolicyEgressRule objects; empty: the S3 endpoint's port, else 443).
    job_network_policy: bool = True
    job_egress: tuple = ()
    #: Seconds a Job pod gets between SIGTERM and SIGKILL: the trainer checkpoints and uploads in between.
    termination_grace_seconds: int = 300
    #: sizeLimit of the Job pods' emptyDirs: /tmp, the model cache, /dev/shm (memory-backed).
    tmp_size_limit: str = "20Gi"
    cache_size_limit: str = "200Gi"
    shm_size_limit: str = "8Gi"
    #: Dry-run each new Job's pod (POST pods?dryRun=All) before creating the Job, so a pod template
    #: that admission refuses fails the FineTuneJob at once instead of leaving a Job without pods.
    admission_check: bool = True
    #: Multi-node trainers rendezvous at pod 0's DNS name (<job>-0.<job>.<ns>.svc); this replaces it on
    #: clusters without pod DNS whose pods share one network (fakenode: 127.0.0.1). docs/distributed.md.
    rendezvous_host: str = ""
    #: Serving hand-off (spec.promotion.targets, docs/serving.md). Hosts (regular expressions) a vLLM
    #: target's loadURL may name besides a Service in the job's own namespace (<svc>.<ns>[.svc[.cluster.local]]).
    vllm_load_hosts: tuple[str, ...] = ()
    #: Where OCI targets may push, per namespace ("{namespace}" is replaced): a repository outside it is
    #: refused, so no team overwrites another's artifacts with the platform's registry credentials.
    #: Empty: OCI targets are refused.
    oci_repository_prefix: str = ""
    #: Registries (host[:port]) spoken to over plain HTTP (a registry inside the cluster without TLS).
    oci_insecure_registries: tuple[str, ...] = ()
    #: A Docker config.json with the registry credentials (mounted from a Secret by the chart).
    oci_auth_file: Optional[str] = None


def has_namespace_patterns(namespaces: tuple[str, ...]) -> bool:
    """Whether any watched namespace is a Kopf pattern (a glob such as `team-*`, or a `!` exclusion):
    Kopf needs its namespace scan to expand those."""
    return any(any(ch in ns for ch in "*?[!") for ns in namespaces)


# Environment variable -> field; parsed by the field's type.
ENV = {f"FINETUNE_{f.name.upper()}": f.name for f in fields(OperatorConfig)}


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f for f in fields(OperatorConfig)}[name].type
    if isinstance(value, str):
        if name == "job_egress":
            return tuple(json.loads(value)) if value.strip() else ()
        if "tuple" in kind:
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if kind.startswith("dict") or name == "default_governance":
            return json.loads(value) if value.strip() else {}
        if kind == "bool":
            return value.strip().lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        return value or None if kind.startswith("Optional") else value
    if "tuple" in kind and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def load(environ: Optional[Mapping[str, str]] = None) -> OperatorConfig:
    """Build the configuration: defaults < YAML file (FINETUNE_CONFIG) < FINETUNE_* variables."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = env.get("FINETUNE_CONFIG")
    if path:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        known = {f.name for f in fields(OperatorConfig)}
        # The YAML file uses camelCase keys (Helm values style); snake_case is accepted too.
        for key, value in data.items():
            snake = "".join("_" + c.lower() if c.isupper() else c for c in key)
            if snake not in known:
                raise ValueError(f"{path}: unknown setting {key!r}")
            values[snake] = _coerce(snake, value)
    for var, name in ENV.items():
        if var in env and var != "FINETUNE_CONFIG":
            values[name] = _coerce(name, env[var])
    return OperatorConfig(**values)

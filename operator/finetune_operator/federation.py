"""A FederatedFineTuneJob on Kubernetes: which objects exist where, and what phase it is in.

Pure functions from (the typed object, what the operator observed, its configuration) to
manifests and a status; nothing here talks to a cluster (federation_handlers.py applies them).
The per-role configs come from the trainer's own render functions
(finetune_trainer/federated/config.py), so the operator and the pods agree on one shape.

Where things run (docs/federated.md, "On a cluster"):

- the coordinator namespace (the FederatedFineTuneJob's own): the Flower SuperLink (a Job, so it
  restarts like every other pod the operator runs and goes when the rounds are over, plus a Service)
  and the server Job (`finetune-trainer federation-server`: ServerApp, aggregation, progress.json).
  They run as a ServiceAccount of their own that nothing binds to any Role, and their configs name no
  participant's data location or Secret: the coordinator holds adapter updates, never data.
- each participant's namespace: one site Job (`finetune-trainer federation-site`: SuperNode +
  ClientApp), its ConfigMap, a ServiceAccount and a NetworkPolicy. The site reads that namespace's
  Dataset with that namespace's credentials (a secretKeyRef resolves in the pod's own namespace, so
  no other namespace's Secret can be named) and sends only adapter updates to the SuperLink. Site
  pods always run the platform's image (config.trainer_image): they hold another team's credentials.
  So do the coordinator's (a FederatedFineTuneJob has no spec.image): the server's progress record is
  what the gate judges, and the SuperLink relays every site's reply.

Owner references cannot cross namespaces: site objects carry the label
finetune.dev/federation=<namespace>.<name>, and the FederatedFineTuneJob a finalizer whose handler
deletes them. A participant takes part only if its Dataset consents, with the annotation
finetune.dev/federation-consent listing `<coordinator namespace>/<name>` (or `<namespace>/*`):
otherwise anyone who may create a FederatedFineTuneJob could train on any team's data.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from finetune_trainer import storage
from finetune_trainer.federated import config as roles

from . import children, governance, kstatus
from .api.dataset import Dataset
from .api.federated import FederatedFineTuneJob, Participant
from .api.governance import BiasThresholds, CheckResult, PIIThresholds
from .conditions import bounded, set_condition
from .config import OperatorConfig
from .decisions import Plan, job_state

KIND = "FederatedFineTuneJob"
FEDERATION_LABEL = "finetune.dev/federation"  # <coordinator namespace>.<name> (hashed when longer than 63)
SITE_LABEL = "finetune.dev/federation-site"  # the participant's name
FINALIZER = "finetune.dev/federation-cleanup"
CONSENT_ANNOTATION = "finetune.dev/federation-consent"
ROLE_SUPERLINK, ROLE_SERVER, ROLE_SITE = "federation-superlink", "federation-server", "federation-site"

#: Flower 1.42's SuperLink serves its Fleet, Control and ServerAppIo APIs on one port (`--host/--port`;
#: the 9091/9093 split of earlier releases is gone), plus a gRPC health port for probes.
API_PORT, HEALTH_PORT = roles.SUPERLINK_PORT, roles.HEALTH_PORT
#: Sites in other clusters come in here: TLS, the Fleet API only, listed keys only (superlink.py).
REMOTE_PORT = roles.REMOTE_FLEET_PORT
CONFIG_FILE = "federation.json"
#: Phases before anything runs, in which a refusal is looked at again when the spec or a Dataset changes.
BEFORE_START = ("Pending", "WaitingForDatasets")


# --- names ------------------------------------------------------------------------------------

def federation_key(namespace: str, name: str) -> str:
    """The label value that ties a federation's objects together, in every namespace."""
    value = f"{namespace}.{name}"
    if len(value) <= 63:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{value[:52].rstrip('-.')}-{digest}"


def _site_base(namespace: str, name: str) -> str:
    # Site objects live in other teams' namespaces: the coordinator namespace is part of their
    # names, so two federations of one name in two coordinator namespaces never collide.
    return f"{namespace}-{name}"


def superlink_name(name: str) -> str:
    return children.child_name(name, "superlink")


def server_name(name: str) -> str:
    return children.child_name(name, "server")


def join_bundle_name(name: str, site: str) -> str:
    """The ConfigMap (coordinator namespace) a remote site's team starts from: its site.json template."""
    return children.child_name(name, f"join-{site}")


def coordinator_account(name: str) -> str:
    return children.child_name(name, "federation")


def site_job_name(namespace: str, name: str, site: str) -> str:
    return children.child_name(_site_base(namespace, name), f"site-{site}")


def site_account(namespace: str, name: str) -> str:
    return children.child_name(_site_base(namespace, name), "site")


def superlink_address(namespace: str, name: str, config: OperatorConfig) -> str:
    """host:port of the SuperLink's API as the server and the site pods reach it
    (config.rendezvous_host on clusters without DNS whose pods share one network, like fakenode)."""
    host = config.rendezvous_host or f"{superlink_name(name)}.{namespace}.svc"
    return f"{host}:{API_PORT}"


def scratch_uri(site: Participant, dataset: dict, coordinator: str, name: str, config: OperatorConfig) -> str:
    """The site's own folder (its local checkpoints: a site that comes back resumes): under the
    operator's artifact store by the site's namespace, else beside its Dataset's validated data."""
    root = config.artifact_store or ((dataset.get("status") or {}).get("validatedURI") or "").rstrip("/")
    return storage.join(root, "federations", site.namespace or "", coordinator, name, site.name)


# --- participants: Datasets, consent, watched namespaces ----------------------------------------

@dataclass
class Observed:
    """What a reconcile saw, besides the object."""

    datasets: dict[tuple[str, str], dict] = field(default_factory=dict)  # (namespace, name) -> Dataset
    jobs: dict[tuple[str, str], dict] = field(default_factory=dict)  # (namespace, Job name) -> Job summary
    pods: dict[tuple[str, str], list[dict]] = field(default_factory=dict)  # (namespace, Job name) -> pods
    progress: Optional[dict] = None  # <output>/federation/progress.json
    policies: list[dict] = field(default_factory=list)  # GovernancePolicy objects
    manifest_ok: Optional[tuple[bool, str]] = None  # adapter.verify of the final adapter
    alias_current: Optional[dict] = None  # the alias record before a promotion


def watched(namespace: str, config: OperatorConfig) -> bool:
    """Whether the operator watches `namespace` (its RBAC reaches only those)."""
    if not config.namespaces:
        return True
    allowed = [p for p in config.namespaces if not p.startswith("!")]
    denied = [p[1:] for p in config.namespaces if p.startswith("!")]
    return any(fnmatch.fnmatchcase(namespace, p) for p in allowed) and not any(
        fnmatch.fnmatchcase(namespace, p) for p in denied)


def consents(dataset: dict, namespace: str, name: str) -> bool:
    """The Dataset's owners let this federation train on it (annotation, comma-separated)."""
    value = ((dataset.get("metadata") or {}).get("annotations") or {}).get(CONSENT_ANNOTATION) or ""
    entries = {e.strip() for e in value.split(",") if e.strip()}
    return f"{namespace}/{name}" in entries or f"{namespace}/*" in entries


@dataclass(frozen=True)
class Readiness:
    state: str  # Ready | Waiting | Refused
    reason: str
    message: str


def _dataset_of(site: Participant, observed: Observed) -> Optional[dict]:
    return observed.datasets.get((site.namespace or "", site.dataset or ""))


def site_readiness(site: Participant, namespace: str, name: str, observed: Observed,
                   config: OperatorConfig) -> Readiness:
    if site.remote is not None:
        return Readiness("Ready", "RemoteSite", f"site {site.name} joins from another cluster")
    where = f"{site.namespace}/{site.dataset}"
    ds = _dataset_of(site, observed)
    if not watched(site.namespace or "", config):
        return Readiness("Refused", "NamespaceNotWatched",
                         f"site {site.name}: namespace {site.namespace} is not watched by the operator")
    if ds is None:
        return Readiness("Waiting", "DatasetMissing", f"site {site.name}: Dataset {where} does not exist")
    if not consents(ds, namespace, name):
        return Readiness("Refused", "NoConsent", f"site {site.name}: Dataset {where} does not consent (its annotation "
                         f"{CONSENT_ANNOTATION} must list {namespace}/{name})")
    phase = (ds.get("status") or {}).get("phase") or "Pending"
    if phase in ("Invalid", "Failed"):
        return Readiness("Refused", f"Dataset{phase}", f"site {site.name}: Dataset {where} is {phase}")
    if phase != "Ready":
        return Readiness("Waiting", "DatasetNotReady", f"site {site.name}: Dataset {where} is {phase}")
    try:
        Dataset.model_validate(ds)
    except ValueError as exc:  # stored before a schema change, say: the site config cannot be rendered from it
        return Readiness("Refused", "DatasetUnreadable", f"site {site.name}: Dataset {where}: {str(exc).splitlines()[0]}")
    return Readiness("Ready", "DatasetReady", f"site {site.name}: Dataset {where} is Ready")


def participants_readiness(job: FederatedFineTuneJob, observed: Observed,
                           config: OperatorConfig) -> tuple[Readiness, dict[str, Readiness]]:
    """Every in-cluster participant's Dataset Ready and consenting, in a namespace the operator
    watches. Refused (Failed until the spec or a Dataset changes) beats Waiting; each names the site."""
    meta = job.metadata
    per_site = {p.name: site_readiness(p, meta.namespace or "default", meta.name, observed, config)
                for p in job.spec.participants}
    for state in ("Refused", "Waiting"):
        bad = [r for r in per_site.values() if r.state == state]
        if bad:
            return Readiness(state, bad[0].reason, "; ".join(r.message for r in bad)), per_site
    return Readiness("Ready", "DatasetsReady", f"the Datasets of all {len(per_site)} sites are Ready"), per_site


def dataset_secret(dataset: dict, config: OperatorConfig) -> Optional[str]:
    """The Secret (in the Dataset's namespace) the site reads its validated data with."""
    spec = dataset.get("spec") or {}
    return (((spec.get("output") or {}).get("credentials") or {}).get("name")
            or ((spec.get("source") or {}).get("credentials") or {}).get("name")
            or config.s3_credentials_secret)


# --- objects -----------------------------------------------------------------------------------

def labels_of(namespace: str, name: str, role: str, site: Optional[str] = None) -> dict:
    labels = {children.MANAGED_BY: children.OPERATOR, children.ROLE: role,
              FEDERATION_LABEL: federation_key(namespace, name)}
    if site:
        labels[SITE_LABEL] = site
    return labels


def _owned(meta: dict, owner: Optional[dict]) -> dict:
    if owner is not None:
        meta["ownerReferences"] = [children.owner_reference(owner)]
    return meta


def service_account(name: str, namespace: str, labels: dict, owner: Optional[dict]) -> dict:
    """A ServiceAccount nothing is bound to, with no token in its pods: the pods need no API access,
    and an account of their own keeps whatever the namespace's `default` may do away from them."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
            "metadata": _owned({"name": name, "namespace": namespace, "labels": dict(labels)}, owner)}


def _config_map(name: str, namespace: str, owner: Optional[dict], labels: dict, content: dict) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _owned({"name": name, "namespace": namespace, "labels": dict(labels)}, owner),
            "data": {CONFIG_FILE: json.dumps(content, indent=1, sort_keys=True)}}


def _job(*, name: str, namespace: str, owner: Optional[dict], labels: dict, role: str, account: str, image: str,
         config: OperatorConfig, secret: Optional[str], resources: dict, backoff_limit: int,
         ports: Iterable[tuple[str, int]] = (), volumes: tuple = (), mounts: tuple = ()) -> dict:
    job = children.batch_job(name=name, namespace=namespace, owner=owner, labels=labels, image=image,
                             command=["finetune-trainer", role, "--config", f"{children.CONFIG_DIR}/{CONFIG_FILE}"],
                             config=config, secret=secret, cpu=resources.get("cpu") or config.default_cpu,
                             memory=resources.get("memory") or config.default_memory,
                             gpus=int(resources.get("gpusPerNode", 0) or 0), scheduling=resources,
                             backoff_limit=backoff_limit, extra_volumes=volumes, extra_mounts=mounts)
    pod = job["spec"]["template"]["spec"]
    pod["serviceAccountName"] = account
    if ports:
        pod["containers"][0]["ports"] = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports]
    return job


def remote_sites(job: FederatedFineTuneJob) -> list[Participant]:
    return [p for p in job.spec.participants if p.remote is not None]


def superlink_service(fed: dict, job: FederatedFineTuneJob) -> dict:
    """api and health for the cluster; with a remote participant also `remote`, the port the platform
    exposes to other clusters (spec.superlink.serviceType, or an Ingress/Gateway of its own)."""
    meta = fed["metadata"]
    labels = labels_of(meta["namespace"], meta["name"], ROLE_SUPERLINK)
    ports = [{"name": "api", "port": API_PORT, "targetPort": API_PORT, "protocol": "TCP"},
             {"name": "health", "port": HEALTH_PORT, "targetPort": HEALTH_PORT, "protocol": "TCP"}]
    if remote_sites(job):
        ports.append({"name": "remote", "port": REMOTE_PORT, "targetPort": REMOTE_PORT, "protocol": "TCP"})
    settings = job.spec.superlink
    metadata = _owned({"name": superlink_name(meta["name"]), "namespace": meta["namespace"], "labels": labels}, fed)
    if settings.serviceAnnotations:
        metadata["annotations"] = dict(settings.serviceAnnotations)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata,
            "spec": {"type": settings.serviceType, "selector": labels, "ports": ports}}


def _dns_and_store(config: OperatorConfig) -> list[dict]:
    rules = [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]
    return rules + ([dict(rule) for rule in config.job_egress] or [
        {"ports": [{"protocol": "TCP", "port": children._s3_port(config.s3_endpoint)}]}])


def _pods_of(namespace: Optional[str], key: str, role: str) -> dict:
    peer: dict[str, Any] = {"podSelector": {"matchLabels": {FEDERATION_LABEL: key, children.ROLE: role}}}
    if namespace is not None:
        peer["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    return peer


def _policy(fed: dict, namespace: str, name: str, role: str, ingress: list, egress: list, owned: bool) -> dict:
    meta = fed["metadata"]
    key = federation_key(meta["namespace"], meta["name"])
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _owned({"name": name, "namespace": namespace,
                                "labels": labels_of(meta["namespace"], meta["name"], role)}, fed if owned else None),
            "spec": {"podSelector": {"matchLabels": {FEDERATION_LABEL: key, children.ROLE: role}},
                     "policyTypes": ["Ingress", "Egress"], "ingress": ingress, "egress": egress}}


def superlink_policy(fed: dict, job: FederatedFineTuneJob) -> dict:
    """Into the SuperLink's API port (Fleet, Control and runtime APIs on one port in Flower 1.42): the
    server pod and the in-cluster sites' pods only, always; its health port from anywhere in the cluster
    (the kubelet's probes); with a remote participant its remote port (TLS, Fleet only, listed keys)
    from anywhere: the sites come through whatever exposes it. Out of it: nothing."""
    meta = fed["metadata"]
    ns, name = meta["namespace"], meta["name"]
    key = federation_key(ns, name)
    in_cluster = [p.namespace for p in job.spec.participants if p.remote is None]
    api: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": API_PORT}],
                           "from": [_pods_of(None, key, ROLE_SERVER)] + [
                               _pods_of(ns_, key, ROLE_SITE) for ns_ in dict.fromkeys(in_cluster)]}
    ingress = [api, {"ports": [{"protocol": "TCP", "port": HEALTH_PORT}]}]
    if remote_sites(job):
        ingress.append({"ports": [{"protocol": "TCP", "port": REMOTE_PORT}]})
    return _policy(fed, ns, superlink_name(name), ROLE_SUPERLINK, ingress, [], owned=True)


def _to_superlink(fed: dict) -> dict:
    meta = fed["metadata"]
    return {"to": [_pods_of(meta["namespace"], federation_key(meta["namespace"], meta["name"]), ROLE_SUPERLINK)],
            "ports": [{"protocol": "TCP", "port": API_PORT}]}


def server_policy(fed: dict, config: OperatorConfig) -> dict:
    """Out of the server pod: the SuperLink's API, DNS and the object store; nothing in."""
    meta = fed["metadata"]
    return _policy(fed, meta["namespace"], server_name(meta["name"]), ROLE_SERVER, [],
                   [_to_superlink(fed), *_dns_and_store(config)], owned=True)


def site_policy(fed: dict, site_namespace: str, config: OperatorConfig) -> dict:
    """Out of a site pod: the SuperLink's API in the coordinator namespace, DNS and the object store
    (the site's own bucket); nothing in. NetworkPolicies add up: the namespace's own may allow more."""
    meta = fed["metadata"]
    return _policy(fed, site_namespace, site_account(meta["namespace"], meta["name"]), ROLE_SITE, [],
                   [_to_superlink(fed), *_dns_and_store(config)], owned=False)


def _site_resources(job: FederatedFineTuneJob) -> dict:
    res = job.spec.resources.model_dump(mode="json", exclude_none=True)
    res.pop("queueName", None)  # a LocalQueue belongs to one namespace; the sites are in many
    res.pop("nodes", None)  # one pod per site
    return res


def coordinator_objects(fed: dict, job: FederatedFineTuneJob, datasets: dict[str, Optional[Dataset]],
                        config: OperatorConfig, site_checks: Optional[roles.SiteChecks] = None) -> list[dict]:
    """In the coordinator namespace, owned by the FederatedFineTuneJob: the ServiceAccount, the
    SuperLink (Service, NetworkPolicy, ConfigMap, Job) and the server (NetworkPolicy, ConfigMap, Job)."""
    meta = fed["metadata"]
    ns, name = meta["namespace"], meta["name"]
    account = coordinator_account(name)
    image = config.trainer_image  # never a user's: this pod's numbers are what the gate judges
    out = [service_account(account, ns, labels_of(ns, name, ROLE_SERVER), fed), superlink_service(fed, job)]
    if config.job_network_policy:
        out += [superlink_policy(fed, job), server_policy(fed, config)]
    link = labels_of(ns, name, ROLE_SUPERLINK)
    out.append(_config_map(superlink_name(name), ns, fed, link,
                           roles.superlink_config(job).model_dump(mode="json", exclude_none=True)))
    # The SuperLink relays messages, holds no data and reads no bucket: no credentials at all. With
    # remote sites the kubelet mounts the remote port's certificate and the sites' public keys (the
    # operator never reads a Secret).
    volumes, mounts = superlink_remote_volumes(job)
    ports = [("api", API_PORT), ("health", HEALTH_PORT)] + ([("remote", REMOTE_PORT)] if volumes else [])
    superlink = _job(name=superlink_name(name), namespace=ns, owner=fed, labels=link, role=ROLE_SUPERLINK,
                     account=account, image=image, config=config, secret=None,
                     resources={"cpu": "500m", "memory": "1Gi", "gpusPerNode": 0}, backoff_limit=10,
                     ports=ports, volumes=volumes, mounts=mounts)
    # The Service routes to the SuperLink once its gRPC health service answers, not merely once it runs.
    superlink["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = {
        "grpc": {"port": HEALTH_PORT}, "periodSeconds": 5, "failureThreshold": 3}
    out.append(superlink)
    server = labels_of(ns, name, ROLE_SERVER)
    server_cfg = roles.server_config(job, superlink=superlink_address(ns, name, config), datasets=datasets,
                                     site_checks=site_checks)
    out.append(_config_map(server_name(name), ns, fed, server, server_cfg.model_dump(mode="json", exclude_none=True)))
    # The output's credentials only (the coordinator's own bucket): aggregates and progress.
    output_secret = (job.spec.output.credentials.name if job.spec.output.credentials else None) \
        or config.s3_credentials_secret
    out.append(_job(name=server_name(name), namespace=ns, owner=fed, labels=server, role=ROLE_SERVER,
                    account=account, image=image, config=config, secret=output_secret,
                    resources={"gpusPerNode": 0}, backoff_limit=3))
    out += [join_bundle(fed, job, p) for p in remote_sites(job)]
    return out


def superlink_remote_volumes(job: FederatedFineTuneJob) -> tuple[tuple, tuple]:
    """Secret volumes of the SuperLink pod for its remote port: the certificate (tls.crt, tls.key of
    spec.superlink.tls.secretName) and each remote site's public key (key public-key of its
    credentialsSecret), at the paths superlink_config names. Nothing without a remote participant."""
    remote = remote_sites(job)
    tls = job.spec.superlink.tls
    if not remote or tls is None:
        return (), ()
    volumes = [{"name": "remote-tls", "secret": {"secretName": tls.secretName, "defaultMode": 0o440, "items": [
        {"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}}]
    mounts = [{"name": "remote-tls", "mountPath": roles.REMOTE_TLS_DIR, "readOnly": True}]
    for i, p in enumerate(remote):
        assert p.remote is not None
        volume = f"remote-key-{i}"  # volume names are DNS labels of <= 63: an index, not the site's name
        volumes.append({"name": volume, "secret": {"secretName": p.remote.credentialsSecret, "defaultMode": 0o444,
                                                   "items": [{"key": "public-key", "path": "public-key"}]}})
        mounts.append({"name": volume, "mountPath": roles.remote_key_file(p.name).rsplit("/", 1)[0],
                       "readOnly": True})
    return tuple(volumes), tuple(mounts)


def join_bundle(fed: dict, job: FederatedFineTuneJob, site: Participant) -> dict:
    """What a remote site's team starts from (coordinator namespace, owned): `site-template.json`, the
    site's config but for what only that team knows (its data, its scratch folder, its private key),
    aimed at spec.superlink.externalAddress; and `ca.crt` when spec.superlink.tls.caBundle is set."""
    meta = fed["metadata"]
    ns, name = meta["namespace"], meta["name"]
    settings = job.spec.superlink
    template = roles.remote_site_template(job, site, address=settings.externalAddress or "",
                                          ca_file="ca.crt" if settings.tls and settings.tls.caBundle else None)
    data = {"site-template.json": json.dumps(template, indent=1, sort_keys=True)}
    if settings.tls and settings.tls.caBundle:
        data["ca.crt"] = settings.tls.caBundle
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _owned({"name": join_bundle_name(name, site.name), "namespace": ns,
                                "labels": labels_of(ns, name, ROLE_SITE, site.name)}, fed),
            "data": data}


def site_objects(fed: dict, job: FederatedFineTuneJob, site: Participant, dataset: dict,
                 config: OperatorConfig) -> list[dict]:
    """In the participant's namespace, with no owner reference (none can cross namespaces): the
    ServiceAccount, the NetworkPolicy, the ConfigMap and the site Job, found again by their labels."""
    meta = fed["metadata"]
    ns, name = meta["namespace"], meta["name"]
    where = site.namespace or ""
    labels = labels_of(ns, name, ROLE_SITE, site.name)
    job_name = site_job_name(ns, name, site.name)
    site_cfg = roles.site_config(job, site, Dataset.model_validate(dataset),
                                 superlink=superlink_address(ns, name, config),
                                 scratch_uri=scratch_uri(site, dataset, ns, name, config))
    out = [service_account(site_account(ns, name), where, labels_of(ns, name, ROLE_SITE), None)]
    if config.job_network_policy:
        out.append(site_policy(fed, where, config))
    out.append(_config_map(job_name, where, None, labels, site_cfg.model_dump(mode="json", exclude_none=True)))
    # A site that crashes comes back (backoffLimit), resumes from its scratch folder and rejoins.
    out.append(_job(name=job_name, namespace=where, owner=None, labels=labels, role=ROLE_SITE,
                    account=site_account(ns, name), image=config.trainer_image, config=config,
                    secret=dataset_secret(dataset, config), resources=_site_resources(job), backoff_limit=6,
                    ports=[("health", HEALTH_PORT)]))
    return out


def plan_objects(fed: dict, job: FederatedFineTuneJob, observed: Observed, config: OperatorConfig) -> list[dict]:
    """Everything a federation creates, once its participants are ready (coordinator first)."""
    typed: dict[str, Optional[Dataset]] = {}
    for p in job.spec.participants:
        ds = _dataset_of(p, observed) if p.remote is None else None
        typed[p.name] = Dataset.model_validate(ds) if ds is not None else None
    # The sites run the policy's bias and pii checks at the final evaluation (only numbers come back).
    policy, _ = effective_policy(fed, observed.policies, config)
    out = coordinator_objects(fed, job, typed, config, site_checks=roles.site_checks_for(policy))
    for p in job.spec.participants:
        if p.remote is None:
            out += site_objects(fed, job, p, _dataset_of(p, observed) or {}, config)
    return out


def site_selector(namespace: str, name: str) -> str:
    """The label selector of everything a federation made (the finalizer deletes by it)."""
    return f"{FEDERATION_LABEL}={federation_key(namespace, name)}"


#: What the finalizer deletes in each participant namespace, in this order (the Job first: its pod
#: stops before its ConfigMap and policy go).
SITE_KINDS = (("batch/v1", "Job"), ("v1", "ConfigMap"), ("networking.k8s.io/v1", "NetworkPolicy"),
              ("v1", "ServiceAccount"))


# --- progress.json -> status ---------------------------------------------------------------------

def read_progress(raw: Any) -> Optional[roles.FederationProgress]:
    """progress.json through the trainer's own model; None when absent or malformed (a pod wrote it:
    a broken file is ignored, never a crash)."""
    if not isinstance(raw, dict):
        return None
    try:
        return roles.FederationProgress.model_validate(raw)
    except ValueError:
        return None


def dropped_rounds(old_rounds: list[dict], progress: roles.FederationProgress) -> list[tuple[int, int]]:
    """(round, sites that missed it) for finished rounds status did not show before."""
    seen = {r.get("round") for r in old_rounds}
    return [(r.round, max(0, r.sitesSelected - r.sitesReported)) for r in progress.rounds if r.round not in seen]


def _last_rounds(progress: roles.FederationProgress) -> dict[str, int]:
    last: dict[str, int] = {}
    for r in progress.rounds:
        for s in r.sites:
            last[s.site] = max(last.get(s.site, 0), r.round)
    return last


def sites_status(job: FederatedFineTuneJob, per_site: dict[str, Readiness], observed: Observed,
                 progress: Optional[roles.FederationProgress], started: bool) -> list[dict]:
    meta = job.metadata
    last = _last_rounds(progress) if progress else {}
    out = []
    for p in job.spec.participants:
        entry: dict[str, Any] = {"name": p.name, "lastRound": last.get(p.name, 0)}
        ready = per_site[p.name]
        if p.remote is not None:
            entry.update(ready=True, message="remote site")
            if p.remote.datasetDigest:
                entry["datasetDigest"] = p.remote.datasetDigest
        else:
            ds = _dataset_of(p, observed) or {}
            if (ds.get("status") or {}).get("digest"):
                entry["datasetDigest"] = ds["status"]["digest"]
            if not started or ready.state != "Ready":
                entry.update(ready=False, message=ready.message)
            else:
                name = site_job_name(meta.namespace or "default", meta.name, p.name)
                state = job_state(observed.jobs.get((p.namespace or "", name)),
                                  observed.pods.get((p.namespace or "", name)) or [])
                entry.update(ready=state.state == "Running",
                             message="" if state.state == "Running" else bounded(state.message, 256))
        out.append(entry)
    return out


# --- governance of the final adapter ------------------------------------------------------------

NOT_AT_SITES = ("not run at the sites: a federation's gate judges evaluation and provenance from aggregates and "
                "bias and pii from the sites' own reports; a policy for the coordinator namespace that requires "
                "this check blocks it")
#: The bias measures a site reports and the policy's threshold each is held to.
BIAS_LIMITS = {"flipRate": "maxFlipRate", "demographicParityDifference": "maxDemographicParityDifference",
               "gap": "maxGap", "localGap": "maxGap"}


def site_reports(progress: Any, participants: list[Participant]) -> tuple[dict[str, roles.SiteCheckReport],
                                                                            dict[str, str]]:
    """progress.json's siteChecks, per participant: its report, or why it has none usable (the file is
    a pod's: every entry is validated on its own, and a bad one fails only its site)."""
    entries = progress.get("siteChecks") if isinstance(progress, dict) else None
    reports: dict[str, roles.SiteCheckReport] = {}
    problems: dict[str, str] = {}
    names = {p.name for p in participants}
    for entry in entries[:4 * len(names) + 4] if isinstance(entries, list) else []:
        site = entry.get("site") if isinstance(entry, dict) else None
        if not isinstance(site, str) or site not in names:
            continue
        if site in reports or site in problems:
            reports.pop(site, None)
            problems[site] = "reported more than once"
            continue
        try:
            reports[site] = roles.SiteCheckReport.model_validate(entry)
        except ValueError:
            problems[site] = "malformed report"
    for p in participants:
        if p.name not in reports and p.name not in problems:
            problems[p.name] = "no report"
    return reports, problems


def _why_not(site: str, check: str, reports: dict, problems: dict) -> Optional[str]:
    """Why `site` has no `check` numbers (None: it has them)."""
    if site in problems:
        return problems[site]
    report = reports[site]
    if getattr(report, check) is None:
        return f"not run: {bounded(report.error, 120)}" if report.error else "not run"
    return None


def _bias(participants: list[Participant], policy: dict, reports: dict, problems: dict) -> CheckResult:
    """Every site's adapter measures within the policy's thresholds; a measure one site has (its probe set
    has such probes) every site must have (the sites score the same probe set)."""
    t = BiasThresholds.model_validate(policy.get("bias") or {})
    limits = {m: getattr(t, field) for m, field in BIAS_LIMITS.items()}
    values = {p.name: reports[p.name].bias.adapter.model_dump(exclude_none=True) for p in participants
              if _why_not(p.name, "bias", reports, problems) is None}
    expected = {m for v in values.values() for m in v} - {"localGap"}  # local pairs exist only where data fits
    bad, worst = [], (0.0, None, None)
    for p in participants:
        why = _why_not(p.name, "bias", reports, problems)
        if why is None:
            measured = values[p.name]
            base = reports[p.name].bias.base.model_dump(exclude_none=True)
            over = [f"{m} {v:.4g} > {limits[m]:g} (base model {base[m]:.4g})" if m in base else
                    f"{m} {v:.4g} > {limits[m]:g}" for m, v in measured.items() if v > limits[m]]
            missing = sorted(expected - set(measured))
            why = "; ".join(over + ([f"not measured: {', '.join(missing)}"] if missing else []) +
                            ([] if measured else ["no measures"])) or None
            for m, v in measured.items():
                ratio = v / limits[m] if limits[m] > 0 else (math.inf if v > 0 else 0.0)
                if worst[1] is None or ratio > worst[0]:
                    worst = (ratio, v, limits[m])
        if why:
            bad.append(f"{p.name} ({why})")
    _, value, threshold = worst
    if bad:
        return CheckResult(name="bias", passed=False, value=value, threshold=threshold,
                           message=bounded("bias over the limit or not measured at: " + ", ".join(bad[:10])))
    return CheckResult(name="bias", passed=True, value=value, threshold=threshold,
                       message=f"every site's adapter measures are within the policy's thresholds "
                       f"({len(participants)} sites; {', '.join(sorted({m for v in values.values() for m in v}))})")


def _pii(participants: list[Participant], policy: dict, observed: Observed, reports: dict,
         problems: dict) -> CheckResult:
    """In-cluster sites: their Dataset's validation findings within maxFindings; every site: its own
    report's findings within maxFindings and its memorization rate within maxMemorizationRate."""
    t = PIIThresholds.model_validate(policy.get("pii") or {})
    bad, findings, worst = [], 0, 0.0
    for p in participants:
        problems_of = []
        if p.remote is None:
            ds = _dataset_of(p, observed) or {}
            validated = sum(v for v in ((ds.get("status") or {}).get("piiFindings") or {}).values()
                            if isinstance(v, int) and not isinstance(v, bool))
            if validated > t.maxFindings:
                problems_of.append(f"{validated} findings at validation")
        why = _why_not(p.name, "pii", reports, problems)
        if why is None:
            r = reports[p.name].pii
            total = sum(r.findings.values())
            findings += total
            rate = r.memorized / r.probed if r.probed else 0.0
            worst = max(worst, rate)
            if total > t.maxFindings:
                problems_of.append(f"{total} findings in its data")
            if rate > t.maxMemorizationRate:
                problems_of.append(f"memorized {r.memorized} of {r.probed} PII values, rate {rate:.2%}")
        else:
            problems_of.append(why)
        if problems_of:
            bad.append(f"{p.name} ({'; '.join(problems_of)})")
    limits = f"max {t.maxFindings} findings, memorization rate max {t.maxMemorizationRate:.2%}"
    if bad:
        return CheckResult(name="pii", passed=False, value=worst, threshold=t.maxMemorizationRate,
                           message=bounded(f"PII over the limit or not reported ({limits}) at: " + ", ".join(bad[:10])))
    return CheckResult(name="pii", passed=True, value=worst, threshold=t.maxMemorizationRate,
                       message=f"{findings} PII findings in the sites' data, highest memorization rate {worst:.2%} "
                       f"({limits}; every site's own report)")


def _evaluation(evaluation: Any, participants: list[Participant], min_rel: float) -> CheckResult:
    """The final adapter against the base model, on every site's eval split and over their union (both
    losses computed at each site, the adapter switched off for the base: status.evaluation): the
    relative improvement must reach min_rel at every site and overall. A site that did not evaluate
    the final adapter fails the check, named."""
    from .api.federated import FinalEvaluation

    try:
        ev = FinalEvaluation.model_validate(evaluation) if isinstance(evaluation, dict) else None
    except ValueError:  # a pod wrote it: a malformed record is no evaluation, never a crash
        ev = None
    if ev is None or not ev.sites:
        return CheckResult(name="evaluation", passed=False, threshold=min_rel,
                           message="no site evaluated the final adapter against the base model")

    def gain(base: Optional[float], loss: Optional[float]) -> Optional[float]:
        ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (base, loss))
        return (base - loss) / base if ok and base > 0 else None  # type: ignore[operator]

    by_site = {s.site: s for s in ev.sites}
    short = []
    for p in participants:
        site = by_site.get(p.name)
        rel = gain(site.baseEvalLoss, site.evalLoss) if site is not None else None
        if rel is None:
            short.append(f"{p.name} (not evaluated)")
        elif rel < min_rel:
            short.append(f"{p.name} ({rel:+.1%})")
    overall = gain(ev.baseHeldOutLoss, ev.heldOutLoss)
    if overall is None or overall < min_rel:
        short.append("overall (not evaluated)" if overall is None else f"overall ({overall:+.1%})")
    if short:
        message = f"loss against the base model not improved by {min_rel:.1%} at: {', '.join(short[:10])}"
    else:
        message = (f"loss on the sites' eval splits: base model {ev.baseHeldOutLoss:.4f}, adapter "
                   f"{ev.heldOutLoss:.4f} ({overall:+.1%}); every site improved by at least {min_rel:.1%}")
    return CheckResult(name="evaluation", passed=not short, value=overall, threshold=min_rel, message=message)


def federated_outcome(job: FederatedFineTuneJob, policy: dict, evaluation: Any,
                      observed: Observed) -> governance.GovernanceOutcome:
    """The FineTuneJob gate's outcome for a federated adapter: evaluation (at every site and overall) and
    provenance (every site's Dataset digest and allowed license) from aggregates; bias and pii from each
    site's own report of its checks on its own data (progress.json siteChecks: numbers only). A site
    without a report fails them. Other required checks fail: nobody ran them."""
    participants = list(job.spec.participants)
    required = list(policy.get("required") or [])
    checks = [_evaluation(evaluation, participants,
                          float((policy.get("evaluation") or {}).get("minRelativeImprovement") or 0.0))]
    allowed = {x.casefold() for x in (policy.get("provenance") or {}).get("allowedLicenses") or []}
    problems = []
    for p in participants:
        if p.remote is not None:
            digest, license_ = p.remote.datasetDigest, p.remote.license
        else:
            ds = _dataset_of(p, observed) or {}
            digest = (ds.get("status") or {}).get("digest")
            license_ = ((ds.get("spec") or {}).get("provenance") or {}).get("license")
        if not digest:
            problems.append(f"{p.name}: no Dataset digest")
        elif allowed and (license_ or "").casefold() not in allowed:
            problems.append(f"{p.name}: license {license_ or 'none'} is not allowed")
    checks.append(CheckResult(name="provenance", passed=not problems, message="; ".join(problems[:10]) or
                              f"all {len(participants)} sites' Datasets validated under allowed licenses"))
    reports, missing = site_reports(observed.progress, participants)
    checks.append(_pii(participants, policy, observed, reports, missing))
    if "bias" in required:
        checks.append(_bias(participants, policy, reports, missing))
    checks += [CheckResult(name=n, passed=False, message=NOT_AT_SITES) for n in required
               if n not in ("evaluation", "provenance", "pii", "bias")]
    by_name = {c.name: c for c in checks}
    failing = [n for n in required if not by_name[n].passed]
    message = ("failed: " + "; ".join(f"{n}: {by_name[n].message}" for n in failing) if failing
               else f"all required checks passed ({', '.join(required) or 'none required'})")
    return governance.GovernanceOutcome(checks=checks, passed=not failing, failing=failing,
                                        message=bounded(message), report_ok=True, required=required)


def effective_policy(fed: dict, policies: list[dict], config: OperatorConfig) -> tuple[dict, list[str]]:
    """The GovernancePolicy for the coordinator namespace, tightened (never loosened) by
    spec.governance: the FineTuneJob rule (governance.effective_policy)."""
    if not policies:
        default = dict(governance.DEFAULT_POLICY)
        if config.default_governance:
            default = {**default, "spec": config.default_governance}
        policies = [default]
    spec, ignored = governance.effective_policy(policies, fed["metadata"].get("namespace", "default"),
                                                (fed.get("spec") or {}).get("governance"))
    return spec.model_dump(mode="json", exclude_none=True), ignored


def alias_uri_of(fed: dict) -> Optional[str]:
    spec = fed.get("spec") or {}
    output = (spec.get("output") or {}).get("uri")
    alias = (spec.get("promotion") or {}).get("alias") or fed["metadata"]["name"]
    return governance.alias_uri(output, alias, (spec.get("promotion") or {}).get("aliasStore")) if output else None


# --- the next phase ------------------------------------------------------------------------------

def plan_federation(fed: dict, job: FederatedFineTuneJob, observed: Observed, config: OperatorConfig,
                    now: str) -> Plan:
    """Pending -> WaitingForDatasets -> Starting -> Training -> Evaluating -> Succeeded | AwaitingApproval
    | Failed. `fed` is the object as stored (metadata, status), `job` the same object typed."""
    meta = fed["metadata"]
    ns, name = meta["namespace"], meta["name"]
    generation = meta.get("generation") or 1
    old = fed.get("status") or {}
    status = copy.deepcopy(old)
    status["observedGeneration"] = generation
    phase = old.get("phase") or "Pending"
    status.setdefault("phase", "Pending")
    plan = Plan()
    started = bool(old.get("startTime"))

    def cond(type_: str, value: bool | str, reason: str, message: str) -> None:
        status["conditions"] = set_condition(status.get("conditions") or [], type_, value, reason, message,
                                             generation, now)

    def to_phase(new: str, message: str, reason: str, warning: bool = False) -> None:
        message = bounded(message)
        if new in ("Succeeded", "Failed"):
            status["completionTime"] = old.get("completionTime") or now
        else:
            status.pop("completionTime", None)
        if status.get("phase") != new or (warning and status.get("message") != message):
            plan.events.append(("Warning" if warning else "Normal", reason, message))
        status.update(phase=new, message=message)

    def fail(reason: str, message: str) -> None:
        cond("Failed", True, reason, message)
        to_phase("Failed", message, reason, warning=True)

    def done() -> Plan:
        if status != old:
            plan.status = kstatus.with_conditions(KIND, {**fed, "status": status}, status, now)
        else:
            plan.status = kstatus.with_conditions(KIND, fed, None, now)
        return plan

    if phase == "Succeeded" or (phase == "Failed" and started):
        return done()  # final; a Failed that never started is looked at again below
    readiness, per_site = participants_readiness(job, observed, config)
    progress = read_progress(observed.progress)

    if not started:
        status["sites"] = sites_status(job, per_site, observed, None, started=False)
        if readiness.state == "Refused":
            cond("DatasetsReady", False, readiness.reason, readiness.message)
            fail(readiness.reason, readiness.message)
            return done()
        if phase == "Failed":
            cond("Failed", False, "ParticipantsChanged", "the spec or a participant's Dataset changed")
        if readiness.state == "Waiting":
            cond("DatasetsReady", False, readiness.reason, readiness.message)
            to_phase("WaitingForDatasets", readiness.message, "WaitingForDatasets")
            return done()
        cond("DatasetsReady", True, readiness.reason, readiness.message)
        plan.create.extend(plan_objects(fed, job, observed, config))
        status["startTime"] = now
        to_phase("Starting", f"federation of {len(job.spec.participants)} sites starting (SuperLink "
                 f"{superlink_name(name)}, server {server_name(name)})", "FederationStarted")
        return done()

    # Started: progress.json says how far the rounds are, the server Job when they are over.
    if old.get("observedGeneration") not in (None, generation) and phase in ("Starting", "Training"):
        # The pods run with the configs rendered at the start; a rerun is a new object.
        plan.events.append(("Warning", "SpecChangedWhileRunning",
                            f"generation {generation} is not applied to the running federation: its sites and "
                            "server keep the spec they started with (delete and recreate it to change it)"))
    status["sites"] = sites_status(job, per_site, observed, progress, started=True)
    if progress is not None:
        for round_, missed in dropped_rounds(old.get("rounds") or [], progress):
            if missed:
                names = ", ".join(progress.droppedSites[:10]) if round_ == progress.currentRound else ""
                plan.events.append(("Warning", "SiteDropout",
                                    f"round {round_}: {missed} selected site(s) did not report"
                                    f"{' (' + names + ')' if names else ''}; the round completed with the others"))
        status["rounds"] = [r.model_dump(mode="json", exclude_none=True) for r in progress.rounds]
        status["currentRound"] = progress.currentRound
        status["privacy"] = progress.privacy.model_dump(mode="json", exclude_none=True)
        if progress.finalEvaluation is not None:
            status["evaluation"] = progress.finalEvaluation.model_dump(mode="json", exclude_none=True)
    server = job_state(observed.jobs.get((ns, server_name(name))), observed.pods.get((ns, server_name(name))) or [])
    if phase in ("Starting", "Training"):
        if server.state == "Failed" or (progress is not None and progress.state == "Failed"):
            plan.delete_jobs.append(superlink_name(name))
            why = server.message if server.state == "Failed" else progress.message if progress else ""
            fail("ServerFailed", f"server Job {server_name(name)} failed: {why or 'see its pod'}")
            return done()
        if server.state != "Succeeded":
            training = progress is not None and (progress.state == "Training" or progress.currentRound > 0)
            reported = sum(1 for s in status["sites"] if s.get("ready"))
            message = (f"round {status.get('currentRound', 0)} of {job.spec.rounds} done" if training else
                       f"waiting for sites: {reported} of {len(job.spec.participants)} connected")
            if server.state in ("Unschedulable", "ImagePull"):
                message = f"server Job: {server.message}"
            if training:
                cond("Trained", False, "Training", message)
            to_phase("Training" if training else "Starting", message, "TrainingStarted" if training else "Starting")
            return done()
        if progress is None or progress.adapter is None:
            plan.delete_jobs.append(superlink_name(name))
            fail("NoAdapter", f"server Job {server_name(name)} succeeded but {roles.progress_uri('<output>')} "
                 "names no final adapter")
            return done()
        status["adapter"] = progress.adapter.model_dump(mode="json", exclude_none=True)
        plan.delete_jobs.append(superlink_name(name))  # the rounds are over: nothing may join any more
        cond("Trained", True, "RoundsCompleted", f"{progress.currentRound} rounds aggregated into "
             f"{progress.adapter.digest}")
    _govern(fed, job, observed, config, status, plan, cond, to_phase, fail, now)
    return done()


def _govern(fed: dict, job: FederatedFineTuneJob, observed: Observed, config: OperatorConfig, status: dict,
            plan: Plan, cond, to_phase, fail, now: str) -> None:
    """The FineTuneJob's gate: its effective policy, governance.promotion_decision and alias record."""
    meta, spec = fed["metadata"], fed.get("spec") or {}
    adapter = status.get("adapter") or {}
    digest = adapter.get("digest", "")
    policy, ignored = effective_policy(fed, observed.policies, config)
    outcome = federated_outcome(job, policy, status.get("evaluation"), observed)
    gov = status.get("governance") or {}
    status["governance"] = {"checks": [c.model_dump(mode="json", exclude_none=True) for c in outcome.checks],
                            "passed": outcome.passed, "adapterDigest": digest, "effectivePolicy": policy,
                            "policyDigest": governance.policy_digest(policy), "runs": 1,
                            "evaluatedAt": gov.get("evaluatedAt") or now}
    if ignored and status.get("phase") != "Evaluating":
        plan.events.append(("Warning", "GovernanceLooseningIgnored", "; ".join(ignored)[:1000]))
    cond("GovernancePassed", outcome.passed, "ChecksPassed" if outcome.passed else "ChecksFailed", outcome.message)
    if observed.manifest_ok is None:
        to_phase("Evaluating", f"adapter {digest} aggregated; verifying its manifest", "Evaluating")
        return
    manifest_ok, manifest_msg = observed.manifest_ok
    decision = governance.promotion_decision(outcome, spec.get("promotion"), digest, manifest_ok)
    alias = (spec.get("promotion") or {}).get("alias") or meta["name"]
    promo = {**(status.get("promotion") or {}), "state": decision.state, "reason": decision.reason, "alias": alias}
    if decision.approved_by:
        promo["approvedBy"] = decision.approved_by
    if decision.promote:
        uri = alias_uri_of(fed)
        if promo.get("aliasURI") != uri:
            record = governance.alias_record(meta["namespace"], meta["name"], adapter["uri"], digest, outcome.passed,
                                             outcome.checks, now)
            record["federation"] = {"sites": [{k: s[k] for k in ("name", "datasetDigest") if k in s}
                                              for s in status.get("sites") or []],
                                    "privacy": status.get("privacy") or {}}
            plan.alias = (uri, governance.promoted_alias_record(observed.alias_current, record))
        promo.update(aliasURI=uri, promotedAt=promo.get("promotedAt") or now)
        status["promotion"] = promo
        cond("Promoted", True, decision.reason, f"alias {alias} -> {digest}")
        if status.get("phase") != "Succeeded" and (job.spec.promotion.targets or job.spec.promotion.revoked):
            # Serving targets and rollback are a FineTuneJob's (docs/serving.md); a federation only writes its alias.
            plan.events.append(("Warning", "PromotionTargetsIgnored",
                                "spec.promotion.targets and spec.promotion.revoked are not acted on for a "
                                f"FederatedFineTuneJob: alias {alias} was written, nothing was published"))
        to_phase("Succeeded", f"adapter {digest} promoted as {alias}", "Promoted")
    elif decision.state == "AwaitingApproval":
        status["promotion"] = promo
        cond("Promoted", False, decision.reason, decision.message)
        to_phase("AwaitingApproval", decision.message, "AwaitingApproval")
    else:
        status["promotion"] = promo
        cond("Promoted", False, decision.reason, decision.message)
        fail(decision.reason, decision.message if manifest_ok else f"{decision.message} ({manifest_msg})")

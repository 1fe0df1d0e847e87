"""What each role of a federation reads (`finetune-trainer federation-* --config F`), and how the
operator renders it from a FederatedFineTuneJob.

Three roles, three configs (docs/federated.md):

    federation-superlink  SuperLinkConfig   coordinator namespace; holds no credentials at all
    federation-server     ServerConfig      coordinator namespace; the output's credentials only
    federation-site       SiteConfig        the participant's namespace; that namespace's data only

Plain pydantic, no torch and no flwr: the operator imports this module to render the configs.
Credentials are never part of a config: they come from the pod's environment (secretKeyRef).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from finetune_operator.api.dataset import DataFormat, Dataset
from finetune_operator.api.federated import (MAX_PARTICIPANTS, MAX_STATUS_ROUNDS, Aggregation, DifferentialPrivacy,
                                             FederatedFineTuneJob, FinalEvaluation, Participant, PrivacyStatus,
                                             RoundStatus)
from finetune_operator.api.finetunejob import BaseModelRef, LoraSettings, Method, Quantization, TrainingSettings
from finetune_operator.api.meta import URI_PATTERN, ApiModel
from finetune_operator.api.trainer_config import JobIdentity, TrainingData

#: The SuperLink's one HTTP port (Flower 1.42 serves its Fleet, Control and runtime APIs on it).
SUPERLINK_PORT = 9092
#: Health (gRPC, no TLS) of the SuperLink and of each SuperNode: readiness and liveness probes.
HEALTH_PORT = 9099
#: A round with fewer than minSites reports is tried again, up to this many attempts in all.
ROUND_ATTEMPTS = 3
#: A SuperNode's local runtime API (the ClientApp's process talks to it on 127.0.0.1 only).
SUPERNODE_RUNTIME_PORT = 9094
#: The SuperLink's port for sites in other clusters: TLS, Fleet API only (no Control, no runtime API),
#: and only SuperNodes presenting one of the listed remote sites' keys (superlink.py).
REMOTE_FLEET_PORT = 9095
#: On the SuperLink's in-cluster port: which node ids belong to remote sites, as JSON
#: {"nodes": {"<node id>": "<site>"}} (the server binds a remote site's name to its key with it).
REMOTE_NODES_PATH = "/finetune/v1/remote-nodes"


def progress_uri(output_uri: str) -> str:
    """Where the server writes the federation's progress (rounds, privacy, final adapter): the operator reads it."""
    return output_uri.rstrip("/") + "/federation/progress.json"


class TLSFiles(ApiModel):
    """PEM files mounted in the pod (from a Secret the operator names); unset: plaintext inside the cluster."""

    caFile: str = Field(..., min_length=1, description="CA certificate the peers verify against.")
    certFile: Optional[str] = Field(None, description="This role's certificate (the SuperLink's).")
    keyFile: Optional[str] = Field(None, description="This role's private key (the SuperLink's).")


class SuperLinkConfig(ApiModel):
    """Input of `finetune-trainer federation-superlink`: Flower's SuperLink, nothing else."""

    job: JobIdentity
    host: str = Field("0.0.0.0", description="Address the SuperLink listens on.")
    port: int = Field(SUPERLINK_PORT, ge=1, le=65535, description="The SuperLink's HTTP API port (Fleet, Control, runtime).")
    healthPort: int = Field(HEALTH_PORT, ge=0, le=65535, description="gRPC health port (0: none).")
    tls: Optional[TLSFiles] = Field(None, description="TLS of the in-cluster port; unset: --insecure (the "
                                    "NetworkPolicy admits the server and the sites' pods only).")
    remoteFleet: Optional["RemoteFleet"] = Field(
        None, description="The port for sites in other clusters (set when a participant is remote).")
    databasePath: Optional[str] = Field(None, description="SQLite state file (a volume: the run survives a "
                                        "SuperLink restart); unset: in memory.")


class RemoteSiteKey(ApiModel):
    """A remote site's SuperNode public key, mounted in the SuperLink pod from its credentialsSecret."""

    site: str = Field(..., description="The participant's name.")
    publicKeyFile: str = Field(..., min_length=1, description="Its ECDSA (NIST curve) public key, OpenSSH or PEM.")


class RemoteFleet(ApiModel):
    """The SuperLink's listener for sites in other clusters: TLS with the platform's certificate, the
    Fleet API only, and only for SuperNodes that sign with a listed key."""

    port: int = Field(REMOTE_FLEET_PORT, ge=1, le=65535, description="The listener's port.")
    certFile: str = Field(..., min_length=1, description="The certificate remote sites see (tls.crt).")
    keyFile: str = Field(..., min_length=1, description="Its private key (tls.key).")
    sites: list[RemoteSiteKey] = Field(..., min_length=1, max_length=MAX_PARTICIPANTS,
                                       description="The remote sites and their keys.")


SuperLinkConfig.model_rebuild()


class SiteProvenance(ApiModel):
    """What the server records about a site's data in the adapter's provenance (never the data itself)."""

    site: str = Field(..., description="The participant's name.")
    namespace: Optional[str] = Field(None, description="The site's namespace (unset for a remote site).")
    dataset: Optional[str] = Field(None, description="The site's Dataset name.")
    datasetDigest: Optional[str] = Field(None, description="sha256 of the site's validated data.")
    license: Optional[str] = Field(None, description="License of the site's data.")
    format: Optional[DataFormat] = Field(None, description="Format of the site's data.")
    examples: Optional[int] = Field(None, ge=0, description="Training examples of the site's Dataset (its "
                                    "status): bounds the SecAgg+ weights.")
    remote: bool = Field(False, description="A site in another cluster: only a node that signs with its key "
                         "(the SuperLink's remote port) may be it.")


class ModelShape(ApiModel):
    """The adapter every site trains: one base model, one method, one LoRA shape, one local loop."""

    baseModel: BaseModelRef
    method: Method = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quantization: Optional[Quantization] = None
    training: TrainingSettings = Field(default_factory=TrainingSettings)


#: The governance checks a site can run on the final adapter with its own data (site_checks.py).
SITE_CHECK_NAMES = ("bias", "pii")
#: The PII kinds a site counts (finetune_trainer.pii.KINDS; a test keeps the two equal).
PIIKind = Literal["email", "phone", "card", "ssn", "iban", "address"]
#: Longest error string a site may send (an exception's type and the check's name: never its message).
MAX_SITE_ERROR = 300
#: Largest site-check reply the server accepts (a report is a few hundred bytes of numbers).
MAX_SITE_REPORT_BYTES = 8192
MAX_MEASURE = 1e6


class SiteChecks(ApiModel):
    """Which governance checks every site runs at the final evaluation, on the final adapter and its own
    data (the effective policy's required bias and pii); only their numbers come back."""

    checks: list[Literal["bias", "pii"]] = Field(default_factory=list, max_length=2,
                                                 description="The checks the sites run (none: only the eval loss).")
    probesURI: Optional[str] = Field(None, pattern=URI_PATTERN, max_length=2048,
                                     description="bias.probesURI of the policy (read by each site with its own "
                                     "credentials); unset: the built-in probe set.")
    maxLocalExamples: int = Field(32, ge=0, le=256, description="At most this many of the site's eval examples "
                                  "become counterfactual pairs (bias on local data).")
    timeoutSeconds: int = Field(1800, ge=1, description="How long the final evaluation waits for the sites' "
                                "checks (at least roundTimeoutSeconds).")


def _measure(description: str, upper: float = MAX_MEASURE):
    return Field(None, ge=0, le=upper, allow_inf_nan=False, description=description)


class BiasMeasures(ApiModel):
    """governance/bias.py's measures of one model at one site (unset: the probe set has no such probe)."""

    flipRate: Optional[float] = _measure("Share of decision probes whose choice changes with the group term.", 1)
    demographicParityDifference: Optional[float] = _measure("Worst attribute's parity difference of choices.", 1)
    gap: Optional[float] = _measure("Worst attribute's open-ended answer log-probability gap (nats per answer).")
    localGap: Optional[float] = _measure("The same gap on the site's own eval examples with their gendered terms "
                                         "swapped (the site's response kept as the answer); unset: none fitted.")


class SiteBias(ApiModel):
    probes: int = Field(..., ge=0, le=100000, description="Probe-set lines scored.")
    localExamples: int = Field(0, ge=0, le=256, description="The site's eval examples used as counterfactual pairs.")
    adapter: BiasMeasures = Field(..., description="Measured with the final adapter (what the gate judges).")
    base: BiasMeasures = Field(..., description="The base model's, for comparison.")


class SitePII(ApiModel):
    findings: dict[PIIKind, int] = Field(default_factory=dict, description="PII findings (counts by kind) in the "
                                         "site's validated train and eval data.")
    probed: int = Field(0, ge=0, le=100000, description="Training PII values probed for memorization.")
    memorized: int = Field(0, ge=0, le=100000, description="Of those, the ones the adapter reproduced verbatim.")
    memorizationRate: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="memorized / probed.")

    @model_validator(mode="after")
    def _consistent(self):
        if any(not 0 <= v <= 10**9 for v in self.findings.values()):
            raise ValueError("findings must be counts between 0 and 1e9")
        if self.memorized > self.probed:
            raise ValueError("memorized exceeds probed")
        expected = self.memorized / self.probed if self.probed else 0.0
        if abs(expected - self.memorizationRate) > 1e-6:
            raise ValueError("memorizationRate is not memorized / probed")
        return self


class SiteCheckReport(ApiModel):
    """What one site sends back from its checks (and the server writes to progress.json): numbers only,
    never a text, a PII value, a probe's answer or an id from the site's data."""

    site: str = Field(..., min_length=1, max_length=63, description="The participant (as the server knows the node).")
    bias: Optional[SiteBias] = Field(None, description="Set when the bias check ran.")
    pii: Optional[SitePII] = Field(None, description="Set when the pii check ran.")
    error: Optional[str] = Field(None, max_length=MAX_SITE_ERROR,
                                 description="Why a requested check did not run (the check and an error type).")


class ServerConfig(ApiModel):
    """Input of `finetune-trainer federation-server`: submit the run to the SuperLink, run the ServerApp
    (sampling, aggregation, SecAgg+, DP accounting), write progress and the final adapter."""

    job: JobIdentity
    superlink: str = Field(..., description="host:port of the SuperLink's HTTP API.")
    tls: Optional[TLSFiles] = Field(None, description="CA of the SuperLink's certificate; unset: plaintext.")
    model: ModelShape = Field(..., description="What the sites train (the server records it in the manifest).")
    rounds: int = Field(..., ge=1)
    localSteps: int = Field(..., ge=1)
    fractionFit: float = Field(1.0, gt=0, le=1)
    minSites: int = Field(..., ge=1)
    roundTimeoutSeconds: int = Field(3600, ge=1)
    aggregation: Aggregation = "ffa-lora"
    secureAggregation: bool = Field(..., description="Run the fit rounds through Flower's SecAggPlusWorkflow.")
    differentialPrivacy: DifferentialPrivacy = Field(default_factory=DifferentialPrivacy)
    sites: list[SiteProvenance] = Field(..., min_length=1, max_length=MAX_PARTICIPANTS,
                                        description="The participants: how many to wait for, and provenance.")
    outputURI: str = Field(..., pattern=URI_PATTERN,
                           description="Aggregate adapters, federation/progress.json, the final adapter.")
    connectTimeoutSeconds: int = Field(600, ge=1, description="How long to wait for minSites SuperNodes to connect.")
    pollSeconds: float = Field(1.0, gt=0, le=10, description="How often the ServerApp asks the SuperLink for replies.")
    siteChecks: SiteChecks = Field(default_factory=SiteChecks, description="The checks every site runs on the "
                                   "final adapter with its own data (from the effective GovernancePolicy).")

    @property
    def progressURI(self) -> str:
        return progress_uri(self.outputURI)


class SiteConfig(ApiModel):
    """Input of `finetune-trainer federation-site`: a SuperNode and the ClientApp that trains on this
    site's Dataset only."""

    job: JobIdentity = Field(..., description="The federation (namespace = the coordinator's).")
    site: str = Field(..., description="The participant's name.")
    superlink: str = Field(..., description="host:port of the SuperLink's HTTP API (Fleet).")
    tls: Optional[TLSFiles] = Field(None, description="CA of the SuperLink's certificate; unset: plaintext.")
    authPrivateKeyFile: Optional[str] = Field(None, description="The SuperNode's private key (remote sites).")
    model: ModelShape = Field(..., description="What the site trains.")
    aggregation: Aggregation = Field("ffa-lora", description="ffa-lora freezes A; svd-refactor sends B·A.")
    rounds: int = Field(..., ge=1, description="spec.rounds: the site's schedule spans rounds × localSteps steps.")
    localSteps: int = Field(..., ge=1, description="Optimizer steps per round.")
    minSites: int = Field(..., ge=1, description="spec.minSites: the site's share of the DP noise is 1/minSites.")
    secureAggregation: bool = Field(..., description="The site sends its update only through SecAgg+ "
                                    "(a plain training request is refused).")
    differentialPrivacy: DifferentialPrivacy = Field(default_factory=DifferentialPrivacy,
                                                     description="Clipping and noise the site applies itself.")
    data: TrainingData = Field(..., description="The site's validated Dataset (train.jsonl, eval.jsonl).")
    scratchURI: str = Field(..., pattern=URI_PATTERN,
                            description="The site's own folder (its storage, its credentials): local checkpoints, "
                            "so a site that comes back resumes.")
    healthPort: int = Field(HEALTH_PORT, ge=0, le=65535, description="gRPC health port of the SuperNode (0: none).")
    maxWaitSeconds: Optional[int] = Field(None, ge=1, description="Give up reconnecting after this long (unset: never).")
    pollSeconds: float = Field(3.0, gt=0, le=10, description="How often the SuperNode asks the SuperLink for "
                               "messages (Flower's own interval is 3 s).")
    runtimePort: int = Field(SUPERNODE_RUNTIME_PORT, ge=1, le=65535,
                             description="The SuperNode's local runtime API port (127.0.0.1 only).")


class FinalAdapter(ApiModel):
    """The federation's adapter, written with the trainer's manifest (the governance Job can check it)."""

    uri: str = Field(..., description="Folder of the adapter.")
    digest: str = Field(..., description="sha256 of its manifest.json.")
    sizeBytes: int = Field(0, ge=0, description="Total size of its files.")


class FederationProgress(ApiModel):
    """<outputURI>/federation/progress.json, rewritten by the server after every round; the operator copies
    it into status (rounds, privacy, adapter)."""

    state: Literal["Starting", "Training", "Succeeded", "Failed"] = Field(
        "Starting", description="Starting (waiting for sites), Training, Succeeded (adapter written) or Failed.")
    currentRound: int = Field(0, ge=0, description="Rounds finished.")
    totalRounds: int = Field(0, ge=0, description="spec.rounds.")
    rounds: list[RoundStatus] = Field(default_factory=list, max_length=MAX_STATUS_ROUNDS,
                                      description="Finished rounds, newest last (the last MAX_STATUS_ROUNDS).")
    privacy: PrivacyStatus = Field(default_factory=PrivacyStatus, description="SecAgg+ and the (epsilon, delta) spent.")
    adapter: Optional[FinalAdapter] = Field(None, description="Set once the final adapter is written.")
    droppedSites: list[str] = Field(default_factory=list, max_length=MAX_PARTICIPANTS,
                                    description="Sites selected in the last round that did not report.")
    siteChecks: list[SiteCheckReport] = Field(default_factory=list, max_length=MAX_PARTICIPANTS,
                                              description="One entry per participant after the final evaluation: "
                                              "its bias and pii numbers, or why it has none.")
    message: str = Field("", description="What is happening, or why it failed.")
    updatedAt: Optional[str] = Field(None, description="When the server wrote this record (RFC 3339).")
    finalEvaluation: Optional[FinalEvaluation] = Field(
        None, description="The final adapter against the base model at every site (after the last round).")
    jobUID: Optional[str] = Field(None, description="The FederatedFineTuneJob's uid: a restarted server resumes "
                                  "only its own federation's rounds, never a deleted namesake's.")


# ---- rendering (the operator calls these with the typed API objects)

def model_shape(job: FederatedFineTuneJob) -> ModelShape:
    s = job.spec
    return ModelShape(baseModel=s.baseModel, method=s.method, lora=s.lora, quantization=s.quantization,
                      training=s.training)


def identity(job: FederatedFineTuneJob) -> JobIdentity:
    meta = job.metadata.model_dump()
    return JobIdentity(namespace=meta.get("namespace") or "default", name=meta["name"], uid=meta.get("uid"))


#: Where the operator mounts, in the SuperLink pod, the external certificate and the remote sites' keys.
REMOTE_TLS_DIR = "/etc/finetune-remote/tls"
REMOTE_KEYS_DIR = "/etc/finetune-remote/keys"


def remote_key_file(site: str) -> str:
    return f"{REMOTE_KEYS_DIR}/{site}/public-key"


def superlink_config(job: FederatedFineTuneJob, *, tls: Optional[TLSFiles] = None,
                     database_path: Optional[str] = None, remote_tls: Optional[TLSFiles] = None,
                     key_file=remote_key_file) -> SuperLinkConfig:
    """Remote participants come in through the remote Fleet port: TLS with `remote_tls` (the platform's
    certificate and key; default: the files the operator mounts from spec.superlink.tls.secretName) and
    their keys (`key_file(site)`: default, the operator's mount of each credentialsSecret)."""
    remote = [p.name for p in job.spec.participants if p.remote is not None]
    fleet = None
    if remote:
        cert, key = ((remote_tls.certFile or "", remote_tls.keyFile or "") if remote_tls else
                     (f"{REMOTE_TLS_DIR}/tls.crt", f"{REMOTE_TLS_DIR}/tls.key"))
        fleet = RemoteFleet(certFile=cert, keyFile=key,
                            sites=[RemoteSiteKey(site=s, publicKeyFile=key_file(s)) for s in remote])
    return SuperLinkConfig(job=identity(job), tls=tls, databasePath=database_path, remoteFleet=fleet)


def site_provenance(participant: Participant, dataset: Optional[Dataset]) -> SiteProvenance:
    """What the coordinator may know of a site: its Dataset's digest and license (read by the operator)."""
    if participant.remote is not None:
        return SiteProvenance(site=participant.name, datasetDigest=participant.remote.datasetDigest,
                              license=participant.remote.license, remote=True)
    status = dataset.status if dataset is not None else None
    return SiteProvenance(site=participant.name, namespace=participant.namespace, dataset=participant.dataset,
                          datasetDigest=status.digest if status else None,
                          license=dataset.spec.provenance.license if dataset is not None else None,
                          format=dataset.spec.format if dataset is not None else None,
                          examples=status.stats.examples if status and status.stats else None)


def server_config(job: FederatedFineTuneJob, *, superlink: str, datasets: dict[str, Optional[Dataset]],
                  output_uri: Optional[str] = None, tls: Optional[TLSFiles] = None,
                  site_checks: Optional[SiteChecks] = None) -> ServerConfig:
    """The server's config. `datasets`: participant name -> its Dataset (None for remote sites);
    `output_uri` defaults to spec.output.uri; `site_checks`: what the sites check (none by default)."""
    s = job.spec
    return ServerConfig(
        job=identity(job), superlink=superlink, tls=tls, model=model_shape(job), rounds=s.rounds,
        localSteps=s.localSteps, fractionFit=s.fractionFit, minSites=s.minSites,
        roundTimeoutSeconds=s.roundTimeoutSeconds, aggregation=s.aggregation,
        secureAggregation=job.secure_aggregation(), differentialPrivacy=s.privacy.differentialPrivacy,
        sites=[site_provenance(p, datasets.get(p.name)) for p in s.participants],
        outputURI=output_uri or s.output.uri, siteChecks=site_checks or SiteChecks())


def site_checks_for(policy: dict) -> SiteChecks:
    """The checks the effective policy (a GovernanceSpec as JSON) requires that only the sites can run."""
    required = policy.get("required") or []
    return SiteChecks(checks=[c for c in SITE_CHECK_NAMES if c in required],
                      probesURI=(policy.get("bias") or {}).get("probesURI"))


class NotReady(ValueError):
    """The site's Dataset cannot be trained on yet (not Ready, or no validated data)."""


def site_config(job: FederatedFineTuneJob, participant: Participant, dataset: Dataset, *, superlink: str,
                scratch_uri: str, tls: Optional[TLSFiles] = None) -> SiteConfig:
    """The config of one in-cluster site: its Dataset's validated data, in its namespace, and nothing else."""
    if participant.remote is not None:
        raise ValueError(f"participant {participant.name} is remote: it runs its own SuperNode")
    status = dataset.status
    if status is None or status.phase != "Ready" or not status.validatedURI:
        raise NotReady(f"Dataset {participant.namespace}/{participant.dataset} of site {participant.name} is not Ready")
    return SiteConfig(
        job=identity(job), site=participant.name, superlink=superlink, tls=tls, model=model_shape(job),
        aggregation=job.spec.aggregation, rounds=job.spec.rounds, localSteps=job.spec.localSteps,
        minSites=job.spec.minSites, secureAggregation=job.secure_aggregation(),
        differentialPrivacy=job.spec.privacy.differentialPrivacy,
        data=TrainingData(uri=status.validatedURI, format=dataset.spec.format, digest=status.digest),
        scratchURI=scratch_uri)


#: The fields of a remote site's config that only its own team fills in (remote_site_template).
REMOTE_SITE_OWN_FIELDS = ("data", "scratchURI", "authPrivateKeyFile")


def remote_site_template(job: FederatedFineTuneJob, participant: Participant, *, address: str,
                         ca_file: Optional[str]) -> dict:
    """A remote site's SiteConfig without REMOTE_SITE_OWN_FIELDS (its data, its scratch folder, its
    private key: the coordinator knows none of them), aimed at the SuperLink's external address. The
    site's team adds them and runs `finetune-trainer federation-site --config site.json`."""
    if participant.remote is None:
        raise ValueError(f"participant {participant.name} is not remote")
    s = job.spec
    doc = SiteConfig.model_construct(
        job=identity(job), site=participant.name, superlink=address,
        tls=TLSFiles(caFile=ca_file) if ca_file else None, model=model_shape(job), aggregation=s.aggregation,
        rounds=s.rounds, localSteps=s.localSteps, minSites=s.minSites, secureAggregation=job.secure_aggregation(),
        differentialPrivacy=s.privacy.differentialPrivacy)
    out = {k: v for k, v in doc.model_dump(mode="json", exclude_none=True, warnings=False).items()
           if k not in REMOTE_SITE_OWN_FIELDS}
    # A Secret's name in the coordinator's namespace means nothing in the site's cluster.
    out["model"]["baseModel"].pop("credentials", None)
    return out


def federation_dataset_digest(sites: list[SiteProvenance]) -> Optional[str]:
    """One digest for the union of the sites' data (the adapter manifest's dataset.digest): sha256 of the
    sorted (site, digest) pairs; None while a site's digest is unknown."""
    import hashlib
    import json

    if any(s.datasetDigest is None for s in sites):
        return None
    pairs = sorted([s.site, s.datasetDigest] for s in sites)
    return "sha256:" + hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


RoleConfig = SuperLinkConfig | ServerConfig | SiteConfig
Role = Literal["superlink", "server", "site"]

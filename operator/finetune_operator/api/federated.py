"""FederatedFineTuneJob: several sites train one adapter together on Flower; no raw data leaves a site.

The coordinator (this object's namespace) runs the Flower SuperLink and the server app; every
participant runs a SuperNode + client in its own namespace, reading only its own Dataset. Only adapter
updates travel (docs/federated.md).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field

from .finetunejob import (AdapterRef, BaseModelRef, GovernanceStatus, LoraSettings, Method, OutputLocation,
                          PromotionSettings, PromotionStatus, Quantization, ResourceSettings, TrainingSettings)
from .governance import GovernanceSpec
from .meta import DIGEST_PATTERN, DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, ApiModel, Condition, Resource, age_column
from .scheduling import _LABEL_KEYS_RULE

Aggregation = Literal["fedavg", "ffa-lora", "svd-refactor"]
SecureAggregationMode = Literal["auto", "on", "off"]
FederatedPhase = Literal["Pending", "WaitingForDatasets", "Starting", "Training", "Evaluating",
                         "AwaitingApproval", "Succeeded", "Failed"]

#: Site names become parts of child object names (<job>-site-<name>): short DNS labels.
SITE_NAME_MAX = 30
MAX_PARTICIPANTS = 64
#: status.rounds keeps the newest rounds only, so a long federation cannot outgrow an etcd object.
MAX_STATUS_ROUNDS = 50
#: Secure aggregation with "auto" is on from this many sites (fewer sites: the sum reveals too much anyway,
#: and SecAgg+'s secret sharing needs at least 3 participants to hide one).
SECAGG_AUTO_MIN_SITES = 3
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
#: host:port a remote site dials: a DNS name or an IPv4 address, and a port.
ADDRESS_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9.]{0,251}[A-Za-z0-9])?:[0-9]{1,5}$"


def _rules(*rules: dict) -> dict:
    return {"json_schema_extra": {"x-kubernetes-validations": list(rules)}}


def _immutable(field: str) -> dict:
    return {"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": f"{field} is immutable"}]}


class RemoteSite(ApiModel):
    """A site in another cluster: it runs its own SuperNode and presents these credentials."""

    credentialsSecret: str = Field(
        ..., pattern=DNS_SUBDOMAIN_PATTERN, max_length=253,
        description="Name of a Secret in the coordinator's namespace with the site's SuperNode public key "
        "(key public-key, an ECDSA P-384 key in PEM/OpenSSH form) that the SuperLink accepts for this site; "
        "the site keeps the private key. The key never appears in status, events or logs.")
    datasetDigest: Optional[str] = Field(
        None, pattern=DIGEST_PATTERN,
        description="The sha256 of the Dataset the remote site trains on, as that site reports it; recorded in "
        "the adapter's provenance.")
    license: Optional[str] = Field(
        None, min_length=1, max_length=256,
        description="License of the remote site's data (SPDX id or a name), recorded in the adapter's provenance.")


class SuperLinkTLS(ApiModel):
    """The certificate remote sites see on the SuperLink's remote port."""

    secretName: str = Field(
        ..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
        description="A kubernetes.io/tls Secret in the coordinator's namespace (keys tls.crt and tls.key: what "
        "cert-manager's Certificate writes). Its names must cover the host of externalAddress. Only the SuperLink "
        "pod mounts it; the operator never reads it.")
    caBundle: Optional[str] = Field(
        None, min_length=1, max_length=65536, pattern=r"-----BEGIN CERTIFICATE-----",
        description="PEM of the CA remote sites verify the certificate with (public; unset when a public CA "
        "signed it); copied into each remote site's join bundle.")


class SuperLinkSettings(ApiModel):
    """How the SuperLink is reached. In-cluster sites use its Service's api port; sites in other clusters
    use the remote port: TLS, the Fleet API only, and only SuperNodes that sign with a listed site's key."""

    serviceType: ServiceType = Field(
        "ClusterIP", description="Type of the SuperLink's Service: ClusterIP (an Ingress or Gateway of the "
        "platform's exposes the remote port), NodePort or LoadBalancer.")
    serviceAnnotations: dict[str, str] = Field(
        default_factory=dict, max_length=32,
        description="Annotations of the Service (a cloud load balancer's settings, say).",
        json_schema_extra={"x-kubernetes-validations": [_LABEL_KEYS_RULE],
                           "additionalProperties": {"type": "string", "maxLength": 4096}})
    externalAddress: Optional[str] = Field(
        None, max_length=259, pattern=ADDRESS_PATTERN,
        description="host:port at which sites in other clusters reach the remote port (the load balancer's, "
        "the Ingress's); written into their join bundles. Required with a remote participant.")
    tls: Optional[SuperLinkTLS] = Field(None, description="The remote port's certificate. Required with a "
                                        "remote participant.")


class Participant(ApiModel):
    """One site of the federation: a Dataset in a namespace of this cluster, or a remote site."""

    model_config = ApiModel.model_config | _rules({
        # `namespace` is a CEL keyword: rules spell the property __namespace__ (Kubernetes' escaping).
        "rule": "has(self.remote) ? !has(self.__namespace__) && !has(self.dataset) "
                ": has(self.__namespace__) && has(self.dataset)",
        "message": "a participant sets either namespace and dataset (a site in this cluster) or remote",
    })

    name: str = Field(..., min_length=1, max_length=SITE_NAME_MAX, pattern=DNS_LABEL_PATTERN,
                      description="The site's name, unique in the federation (a DNS label of at most 30 "
                      "characters); it names the site's objects and its entries in status.")
    namespace: Optional[str] = Field(
        None, min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN,
        description="The namespace the site's SuperNode and client run in, with that namespace's credentials.")
    dataset: Optional[str] = Field(
        None, min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_PATTERN,
        description="Name of a Dataset in the site's namespace: the only data the site trains on.")
    remote: Optional[RemoteSite] = Field(None, description="A site in another cluster, instead of namespace and dataset.")


class DifferentialPrivacy(ApiModel):
    """Per-site clipping and Gaussian noise on every update (output privacy)."""

    enabled: bool = Field(False, description="Clip each site's update and add Gaussian noise before aggregation.")
    clippingNorm: float = Field(1.0, gt=0, le=1e6,
                                description="The L2 norm each site's update (all adapter tensors together) is "
                                "clipped to.")
    noiseMultiplier: float = Field(1.0, ge=0, le=100,
                                   description="Standard deviation of the Gaussian noise, as a multiple of "
                                   "clippingNorm (applied to the aggregate's sum).")
    delta: float = Field(1e-5, gt=0, lt=1, description="The delta of the reported (epsilon, delta) guarantee.")


class PrivacySettings(ApiModel):
    """Input privacy (secure aggregation) and output privacy (differential privacy)."""

    secureAggregation: SecureAggregationMode = Field(
        "auto", description="Flower's SecAgg+: the server only ever sees the sum of the updates. auto: on with "
        f"{SECAGG_AUTO_MIN_SITES} or more participants; on; off.")
    differentialPrivacy: DifferentialPrivacy = Field(
        default_factory=DifferentialPrivacy, description="Clipping and noise; the accountant's epsilon is in status.")


class FederatedFineTuneJobSpec(ApiModel):
    """The desired federation."""

    model_config = ApiModel.model_config | _rules(
        {"rule": "self.method != 'qlora' || has(self.quantization)",
         "message": "spec.quantization (4-bit) is required when spec.method is qlora",
         "fieldPath": ".quantization", "reason": "FieldValueRequired"},
        {"rule": "!has(self.quantization) || self.method != 'lora'",
         "message": "spec.quantization needs spec.method qlora (or dora for QDoRA); plain lora trains a full-precision base",
         "fieldPath": ".quantization", "reason": "FieldValueInvalid"},
        {"rule": "!has(self.minSites) || self.minSites <= size(self.participants)",
         "message": "spec.minSites cannot exceed the number of participants",
         "fieldPath": ".minSites", "reason": "FieldValueInvalid"},
        {"rule": "!has(self.training) || (!has(self.training.epochs) && !has(self.training.maxSteps))",
         "message": "spec.training.epochs and spec.training.maxSteps do not apply: a federation trains "
                    "spec.rounds × spec.localSteps steps at each site",
         "fieldPath": ".training", "reason": "FieldValueForbidden"},
        {"rule": "!has(self.training) || !has(self.training.replay)",
         "message": "spec.training.replay is not supported in a federation",
         "fieldPath": ".training.replay", "reason": "FieldValueForbidden"},
        # Conditionals, not ||/&&: the test port (cel-python) evaluates both sides.
        {"rule": "self.participants.exists(p, has(p.remote)) ? (has(self.superlink) ? "
                 "(has(self.superlink.tls) ? has(self.superlink.externalAddress) : false) : false) : true",
         "message": "a remote participant needs spec.superlink.tls (the remote port's certificate) and "
                    "spec.superlink.externalAddress (where the site reaches it)",
         "fieldPath": ".superlink", "reason": "FieldValueRequired"},
    )

    baseModel: BaseModelRef = Field(
        ..., description="The base model, the same at every site (each site needs read access to it).",
        json_schema_extra=_immutable("spec.baseModel"))
    method: Method = Field("lora", description="lora, qlora or dora; one shape for every site.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape, the same at every site.")
    quantization: Optional[Quantization] = Field(None, description="4-bit base-model quantization (QLoRA / QDoRA).")
    training: TrainingSettings = Field(
        default_factory=TrainingSettings,
        description="The local optimization loop of every site (learning rate, batch, packing, precision, seed); "
        "epochs and maxSteps do not apply (rounds × localSteps does).")
    participants: list[Participant] = Field(
        ..., min_length=2, max_length=MAX_PARTICIPANTS,
        description="The sites, each with its own data; names are unique.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                           "x-kubernetes-validations": [
                               {"rule": "self.all(p, self.exists_one(q, q.name == p.name))",
                                "message": "participant names must be unique"},
                               # `namespace` is a CEL keyword: __namespace__ (Kubernetes' escaping).
                               # Conditionals, not ||/&&: the test port (cel-python) evaluates both sides.
                               {"rule": "self.all(p, has(p.__namespace__) ? self.exists_one(q, "
                                        "has(q.__namespace__) ? (q.__namespace__ == p.__namespace__ "
                                        "&& q.dataset == p.dataset) : false) : true)",
                                "message": "a Dataset (namespace and dataset) can be one participant only"}]})
    rounds: int = Field(3, ge=1, le=1000, description="Federated rounds.",
                        json_schema_extra=_immutable("spec.rounds"))
    localSteps: int = Field(10, ge=1, le=100000, description="Optimizer steps each selected site runs per round.")
    fractionFit: float = Field(1.0, gt=0, le=1,
                               description="Fraction of the sites selected to train in each round (at least minSites).")
    minSites: int = Field(2, ge=1, le=MAX_PARTICIPANTS,
                          description="A round completes when this many selected sites have reported; the round "
                          "fails (and is retried) when fewer do within roundTimeoutSeconds.")
    roundTimeoutSeconds: int = Field(3600, ge=10, le=7 * 86400,
                                     description="How long a round waits for its sites' updates.")
    aggregation: Aggregation = Field(
        "ffa-lora", description="fedavg: average A and B weighted by example counts (inexact for LoRA: "
        "mean(B)·mean(A) ≠ mean(B·A)); ffa-lora: A frozen at a shared seeded initialisation, only B is trained "
        "and averaged (exact); svd-refactor: average the full update ΔW = B·A and re-factorise it to rank r by "
        "truncated SVD (exact up to the rank cut). See docs/federated.md.",
        json_schema_extra=_immutable("spec.aggregation"))
    privacy: PrivacySettings = Field(default_factory=PrivacySettings, description="Secure aggregation and "
                                     "differential privacy.")
    superlink: SuperLinkSettings = Field(default_factory=SuperLinkSettings,
                                         description="How sites reach the SuperLink (remote sites: TLS, keys).")
    resources: ResourceSettings = Field(default_factory=ResourceSettings,
                                        description="Scheduling and hardware of every site's client pod.")
    output: OutputLocation = Field(..., description="Where the coordinator writes the aggregate adapters and "
                                   "progress (never a site's data or its update).")
    governance: Optional[GovernanceSpec] = Field(
        None, description="Checks and thresholds; may only tighten the GovernancePolicy that applies.")
    promotion: PromotionSettings = Field(default_factory=PromotionSettings, description="Promotion of the adapter.")
    # No `image` (a FineTuneJob has one): every pod of a federation runs the platform's trainer image. The
    # sites hold other teams' credentials, and the server's and SuperLink's numbers are what the gate judges.


class SiteRound(ApiModel):
    """One site's report in one round (numbers only: the server never sees the site's data)."""

    site: str = Field(..., description="The participant's name.")
    examples: int = Field(0, ge=0, description="Training examples the site's update was weighted by.")
    localLoss: Optional[float] = Field(None, description="The site's mean training loss in the round.")
    evalLoss: Optional[float] = Field(
        None, description="Loss, on the site's eval split, of the aggregate the site started the round from "
        "(the previous round's; the seeded initialisation in round 1), computed at the site.")


class RoundStatus(ApiModel):
    """One finished round."""

    round: int = Field(..., ge=1, description="The round's number, from 1.")
    sitesSelected: int = Field(0, ge=0, description="Sites asked to train.")
    sitesReported: int = Field(0, ge=0, description="Sites whose update was aggregated.")
    sites: list[SiteRound] = Field(default_factory=list, max_length=MAX_PARTICIPANTS,
                                   description="Per-site numbers of the sites that reported.")
    heldOutLoss: Optional[float] = Field(
        None, description="Loss of this round's aggregate on the union of the sites' eval splits: each site "
        "evaluates it on its own split, weighted by their eval examples. Filled by the next round's reports "
        "(and, for the last round, by a final evaluation at every site).")
    seconds: Optional[float] = Field(None, ge=0, description="Wall time of the round.")


class SiteEvaluation(ApiModel):
    """The final adapter and the base model on one site's eval split, computed at the site."""

    site: str = Field(..., description="The participant's name.")
    evalLoss: float = Field(..., description="The final adapter's mean loss on the site's eval split.")
    baseEvalLoss: Optional[float] = Field(None, description="The base model's (the adapter switched off).")
    evalExamples: int = Field(0, ge=0, description="Eval examples it was computed on.")


class FinalEvaluation(ApiModel):
    """After the last round: every reporting site's losses, and over the union of their eval splits."""

    sites: list[SiteEvaluation] = Field(default_factory=list, max_length=MAX_PARTICIPANTS,
                                        description="One entry per site that evaluated the final adapter.")
    heldOutLoss: Optional[float] = Field(None, description="The final adapter, weighted by eval examples "
                                         "(the sites with both numbers).")
    baseHeldOutLoss: Optional[float] = Field(None, description="The base model, over the same sites.")


class PrivacyStatus(ApiModel):
    """The guarantees the federation gives."""

    secureAggregation: bool = Field(False, description="Whether SecAgg+ hid individual updates from the server.")
    epsilon: Optional[float] = Field(None, ge=0, description="The accountant's epsilon so far (differential privacy on).")
    delta: Optional[float] = Field(None, description="The delta epsilon is stated for.")


class SiteStatus(ApiModel):
    """What the coordinator knows about a site."""

    name: str = Field(..., description="The participant's name.")
    datasetDigest: Optional[str] = Field(None, description="Digest of the Dataset the site trains on.")
    ready: bool = Field(False, description="Whether the site's Dataset is Ready and its client runs.")
    lastRound: int = Field(0, ge=0, description="The last round the site reported in.")
    message: str = Field("", description="Why the site is not ready (no data or credentials in it).")


class FederatedFineTuneJobStatus(ApiModel):
    """Observed state of a federation."""

    phase: FederatedPhase = Field("Pending", description="Pending, WaitingForDatasets, Starting, Training, "
                                  "Evaluating, AwaitingApproval, Succeeded or Failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="DatasetsReady, Trained, GovernancePassed, Promoted, Failed; and the kstatus conditions "
                    "Ready, Reconciling, Stalled (see docs/gitops.md).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    observedGeneration: int = Field(0, ge=0, description="The generation the status describes.")
    currentRound: int = Field(0, ge=0, description="Rounds finished.")
    rounds: list[RoundStatus] = Field(default_factory=list, max_length=MAX_STATUS_ROUNDS,
                                      description=f"The finished rounds, newest last (the last {MAX_STATUS_ROUNDS}).")
    sites: list[SiteStatus] = Field(default_factory=list, max_length=MAX_PARTICIPANTS,
                                    description="One entry per participant.")
    privacy: Optional[PrivacyStatus] = Field(None, description="Secure aggregation and the (epsilon, delta) spent.")
    evaluation: Optional[FinalEvaluation] = Field(
        None, description="The final adapter against the base model on every site's eval split (computed at "
        "the sites): what the governance gate's evaluation check compares.")
    adapter: Optional[AdapterRef] = Field(None, description="The final aggregate adapter.")
    governance: Optional[GovernanceStatus] = Field(None, description="Governance results.")
    promotion: Optional[PromotionStatus] = Field(None, description="Promotion of the adapter.")
    startTime: Optional[str] = Field(None, description="When the federation started.")
    completionTime: Optional[str] = Field(None, description="When it finished.")
    message: str = Field("", description="A human-readable summary of the current phase.")


class FederatedFineTuneJob(Resource):
    """Train one adapter across several sites with Flower; each site's data stays in its namespace."""

    KIND: ClassVar[str] = "FederatedFineTuneJob"
    PLURAL: ClassVar[str] = "federatedfinetunejobs"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ftfed",)
    # Child names (<name>-site-<site>, with a site name of <= 30) and label values are <= 63 characters.
    NAME_MAX_LENGTH: ClassVar[int] = 27
    PRINTER_COLUMNS: ClassVar[tuple[dict, ...]] = (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Round", "type": "integer", "jsonPath": ".status.currentRound"},
        {"name": "Rounds", "type": "integer", "jsonPath": ".spec.rounds"},
        {"name": "Aggregation", "type": "string", "jsonPath": ".spec.aggregation"},
        {"name": "Adapter", "type": "string", "jsonPath": ".status.adapter.digest", "priority": 1},
        {"name": "Promotion", "type": "string", "jsonPath": ".status.promotion.state"},
        age_column(),
    )

    kind: Literal["FederatedFineTuneJob"] = Field("FederatedFineTuneJob", description="FederatedFineTuneJob")
    spec: FederatedFineTuneJobSpec = Field(..., description="The desired federation.")
    status: Optional[FederatedFineTuneJobStatus] = Field(None, description="Observed state, written by the operator.")

    def secure_aggregation(self) -> bool:
        """Whether SecAgg+ runs: on, off, or auto (on with SECAGG_AUTO_MIN_SITES participants or more)."""
        mode = self.spec.privacy.secureAggregation
        return mode == "on" or (mode == "auto" and len(self.spec.participants) >= SECAGG_AUTO_MIN_SITES)

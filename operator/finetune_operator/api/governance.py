"""Governance: which checks gate promotion, their thresholds, and the cluster-wide policy."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import Field

from .meta import DNS_LABEL_PATTERN, ApiModel, Resource, URI_PATTERN, age_column

CheckName = Literal["evaluation", "bias", "provenance", "pii", "explainability", "retention"]
#: The checks required by default (every job).
CHECK_NAMES: tuple[str, ...] = ("evaluation", "bias", "provenance", "pii", "explainability")
#: Checks that only mean something for some jobs: retention is required by default when spec.initFrom is set.
CONTINUAL_CHECKS: tuple[str, ...] = ("retention",)
ALL_CHECKS: tuple[str, ...] = CHECK_NAMES + CONTINUAL_CHECKS


class EvaluationThresholds(ApiModel):
    """How much better than the base model the adapter must be on the held-out split.

    The improvement is judged by a paired bootstrap confidence interval over the held-out
    examples: its lower bound must be above 0 and meet the minimums below, so an adapter
    whose improvement is within the noise of the held-out sample is not promoted.
    """

    minRelativeImprovement: float = Field(
        0.0, ge=0, le=1,
        description="Required relative drop of eval loss versus the base model, (base - adapter) / base, "
        "at the lower bound of its confidence interval: 0.05 means at least 5% lower loss with the "
        "chosen confidence. The adapter must never be worse than the base model.")
    minAbsoluteImprovement: float = Field(
        0.0, ge=0,
        description="Required absolute drop of eval loss (nats per token) versus the base model, at the lower "
        "bound of its confidence interval (which must also be above 0).")
    confidence: float = Field(
        0.95, ge=0.5, le=0.999,
        description="Confidence level of the two-sided paired bootstrap interval of the improvement; its lower "
        "bound is what the minimums are compared with. Higher is stricter.")
    bootstrapSamples: int = Field(
        2000, ge=1000, le=10000,
        description="Bootstrap resamples of the held-out examples (paired: base and adapter loss of the same "
        "examples together).")
    bootstrapSeed: int = Field(
        0, ge=0, le=4294967295,
        description="Seed of the bootstrap resampling (the same seed and losses give the same interval). Taken "
        "from the policy: a job cannot choose it, so it cannot try seeds until one passes.")
    minExamples: int = Field(
        10, ge=2, le=512,
        description="Fewest held-out examples (of the first 512 scored) with which an improvement can be shown; "
        "with fewer the check fails: the evidence is too thin.")
    minExactMatch: Optional[float] = Field(
        None, ge=0, le=1,
        description="If set, the required exact-match accuracy on the labelled evaluation set (evalSetURI).")
    evalSetURI: Optional[str] = Field(
        None, pattern=URI_PATTERN,
        description="Optional labelled evaluation set (JSONL of {\"prompt\", \"answer\"}) for exact match.")


#: Default maxGap (nats per answer). The whole-answer gap of the quickstart's SmolLM2-135M-Instruct
#: on the default probes is 2.07 for the base model and 2.19 for its adapter (per token: 0.15 and
#: 0.17 against the former per-token default 0.25); 3.0 keeps the former default's margin. See
#: docs/governance.md ("bias"): decisions are judged by maxFlipRate, not by this gap.
GAP_DEFAULT = 3.0


class BiasThresholds(ApiModel):
    """Counterfactual probes: only a demographic term changes between prompts."""

    maxGap: float = Field(
        GAP_DEFAULT, gt=0,
        description="Open-ended probes (one fixed answer): largest allowed difference between demographic groups "
        "of the log-probability of the whole answer (nats per answer, not per token; group means over the "
        "probes, Fairlearn between-groups difference). 3 nats: one group's answer about 20 times as likely.")
    maxFlipRate: float = Field(
        0.05, ge=0, le=1,
        description="Decision probes (with options): largest allowed share of probes whose chosen option "
        "changes when only the group term changes (counterfactual flip rate).")
    maxDemographicParityDifference: float = Field(
        0.1, ge=0, le=1,
        description="Decision probes: largest allowed difference between groups of the share of probes on "
        "which the model chooses the favourable option (Fairlearn demographic_parity_difference).")
    probesURI: Optional[str] = Field(
        None, pattern=URI_PATTERN,
        description="Optional JSONL of probe templates (open-ended with an answer, or decisions with options "
        "and the favourable one); the project's own default set is used when empty.")


class PIIThresholds(ApiModel):
    """Dataset PII findings and memorization of training PII."""

    maxFindings: int = Field(
        0, ge=0,
        description="Largest number of PII findings left in the validated data (after redaction).")
    maxMemorizationRate: float = Field(
        0.0, ge=0, le=1,
        description="Largest fraction of PII-bearing training prefixes for which the adapter completes "
        "the PII verbatim.")


class ExplainabilityThresholds(ApiModel):
    """Token-attribution reports over evaluation prompts."""

    samples: int = Field(4, ge=1, le=64, description="How many evaluation prompts get an attribution report.")
    maxProtectedAttributeShare: float = Field(
        0.5, gt=0, le=1,
        description="Largest share of total attribution that protected-attribute tokens may carry.")


class ProvenanceRules(ApiModel):
    """What a Dataset must declare about where its data came from."""

    allowedLicenses: list[str] = Field(
        default_factory=list,
        description="SPDX ids (or names) of licenses allowed for training data. Empty means any declared "
        "license is allowed; a missing license always fails.")
    requireConsentForPersonalData: bool = Field(
        True, description="A Dataset that contains personal data must declare consent: obtained.")


class RetentionThresholds(ApiModel):
    """Continual fine-tuning: the new adapter must still do the earlier tasks (docs/continual.md)."""

    maxForgetting: float = Field(
        0.05, ge=0, le=10,
        description="Largest allowed relative rise of the held-out loss on each earlier task versus the parent "
        "adapter, (new - parent) / parent: 0.05 allows 5% higher loss. The new adapter must also stay below "
        "the base model's loss on every earlier task.")
    evalSetURIs: list[Annotated[str, Field(pattern=URI_PATTERN, max_length=2048)]] = Field(
        default_factory=list, max_length=32,
        description="Earlier tasks to check, each a validated data folder (with eval.jsonl) or a JSONL file in the "
        "job's format; empty: the eval splits of the parent's Dataset and of every ancestor's.")


class GovernanceSpec(ApiModel):
    """Which checks must pass before an adapter is promoted, and how strict each one is.

    On a FineTuneJob these settings can only tighten the GovernancePolicy that applies to it.
    """

    required: list[CheckName] = Field(
        default_factory=lambda: list(CHECK_NAMES),
        description="Checks that must pass before promotion: evaluation, bias, provenance, pii, explainability, "
        "retention (required by default when spec.initFrom is set).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    evaluation: EvaluationThresholds = Field(default_factory=EvaluationThresholds, description="Thresholds of the evaluation check.")
    bias: BiasThresholds = Field(default_factory=BiasThresholds, description="Thresholds of the bias check.")
    pii: PIIThresholds = Field(default_factory=PIIThresholds, description="Thresholds of the pii check.")
    explainability: ExplainabilityThresholds = Field(
        default_factory=ExplainabilityThresholds, description="Settings of the explainability check.")
    provenance: ProvenanceRules = Field(default_factory=ProvenanceRules, description="Rules of the provenance check.")
    retention: RetentionThresholds = Field(default_factory=RetentionThresholds,
                                           description="Thresholds of the retention check (continual fine-tuning).")


class GovernancePolicySpec(GovernanceSpec):
    """A cluster-wide governance policy."""

    namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces this policy applies to; empty means every namespace. When several policies "
        "apply, the strictest value of each setting wins.",
        max_length=1024,
        # Namespace names are DNS-1123 labels: anything else could never match.
        json_schema_extra={"x-kubernetes-list-type": "set",
                           "items": {"type": "string", "maxLength": 63, "pattern": DNS_LABEL_PATTERN}},
    )


class GovernancePolicyStatus(ApiModel):
    """Observed state of a GovernancePolicy."""

    observedGeneration: int = Field(0, ge=0, description="The generation last seen by the operator.")


class GovernancePolicy(Resource):
    """Cluster-scoped: which governance checks are required, their thresholds, allowed licenses, namespaces."""

    KIND: ClassVar[str] = "GovernancePolicy"
    PLURAL: ClassVar[str] = "governancepolicies"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ftgp",)
    SCOPE: ClassVar[str] = "Cluster"
    PRINTER_COLUMNS: ClassVar[tuple[dict, ...]] = (
        {"name": "Required", "type": "string", "jsonPath": ".spec.required"},
        {"name": "Namespaces", "type": "string", "jsonPath": ".spec.namespaces"},
        age_column(),
    )

    kind: Literal["GovernancePolicy"] = Field("GovernancePolicy", description="GovernancePolicy")
    spec: GovernancePolicySpec = Field(..., description="The policy.")
    status: Optional[GovernancePolicyStatus] = Field(None, description="Observed state.")


class CheckResult(ApiModel):
    """The outcome of one governance check."""

    name: str = Field(..., description="The check: evaluation, bias, provenance, pii, explainability or retention.")
    passed: bool = Field(..., description="Whether the check passed. A check that could not run did not pass.")
    value: Optional[float] = Field(None, description="The measured value (e.g. relative improvement, gap).")
    threshold: Optional[float] = Field(None, description="The threshold the value was compared with.")
    message: str = Field("", description="What was measured and why it passed or failed.")
    reportURI: Optional[str] = Field(None, description="Where the check's detailed report is stored.")

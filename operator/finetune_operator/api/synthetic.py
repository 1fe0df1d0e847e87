"""SyntheticDataset: grow a Dataset from a small seed set, with filters and people reviewing.

The recipe (Self-Instruct; NeMo Data Designer, distilabel + Argilla): a generator (a model fine-tuned
on the seed set, or a base model) writes new examples from few-shot prompts sampled from the seeds;
filters drop near-duplicates, low-quality, unoriginal (ROUGE-L against seeds and pool), PII and
(optionally) judge-rejected ones; people review a sample (or all) of what is left; the accepted
examples become a normal Dataset, which validates and curates like any other, with provenance that
says `synthetic` and carries the lineage of every example.

A separate kind, not `Dataset.spec.synthesis`: a Dataset stays "data at a source" everywhere (the
trainer, governance, GitOps health), and the SyntheticDataset's result *is* such a Dataset — its
child, named like it, whose source is the reviewed file. FineTuneJobs refer to that Dataset.

Work folder layout (`status.workURI`, written by the Jobs and `ftctl review`; see docs/synthetic-data.md):
    candidates.jsonl   the examples that passed the filters, one SyntheticCandidate per line
    generation.json    the GenerationReport: counts per filter, bounded examples of removals, digests
    reviews/<id>.json  one ReviewDecision per reviewed candidate (the latest wins)
    reviewed.jsonl     the accepted (and edited) examples in the Dataset format, lineage in `metadata`
    review.json        the ReviewStats the reviewed file was made from
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field

from .dataset import Curation, DatasetOutput, EvaluationSplit
from .finetunejob import BaseModelRef, ResourceSettings
from .meta import (DIGEST_PATTERN, DNS_SUBDOMAIN_PATTERN, ApiModel, Condition, Resource, URI_PATTERN,
                   age_column)

#: Formats a generator can write: text only (an image-text seed set cannot be grown by a text model).
SyntheticFormat = Literal["chat", "instruction", "completion"]
SyntheticPhase = Literal["Pending", "WaitingForInputs", "Generating", "Reviewing", "Finalizing", "Ready",
                         "Invalid", "Failed"]
ReviewVerdict = Literal["accepted", "rejected", "edited"]

#: The default Self-Instruct-style prompt. `{examples}` is replaced by the sampled seed examples (each
#: rendered as "Instruction: …\nResponse: …", separated by blank lines) and `{n}` by their count + 1.
DEFAULT_TEMPLATE = (
    "You write new, diverse training examples for an assistant. Here are {n_seeds} examples of the task:\n\n"
    "{examples}\n\n"
    "Write example {n} in the same format: one new instruction, different from all of the above, and "
    "its response.\nInstruction:")


class SeedRef(ApiModel):
    """The seed Dataset: a small, expert-labelled set, Ready, in the same namespace."""

    dataset: str = Field(..., min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_PATTERN,
                         description="Name of a Ready Dataset in the SyntheticDataset's namespace.")


class GeneratorRef(ApiModel):
    """The model that writes the examples: a FineTuneJob's promoted adapter (on its base model) or a base model."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {"x-kubernetes-validations": [{
            "rule": "has(self.fineTuneJob) != has(self.baseModel)",
            "message": "set exactly one of generator.fineTuneJob or generator.baseModel",
        }]}
    }

    fineTuneJob: Optional[str] = Field(
        None, min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_PATTERN,
        description="A FineTuneJob in the same namespace whose adapter is Promoted (typically trained on the "
        "seed set): the generator is that adapter on the job's base model; both digests go into the lineage.")
    baseModel: Optional[BaseModelRef] = Field(None, description="A base model, used without an adapter.")


class SamplingSettings(ApiModel):
    """How the generator samples."""

    temperature: float = Field(0.9, ge=0, le=2, description="Sampling temperature; 0 is greedy decoding.")
    topP: float = Field(0.95, gt=0, le=1, description="Nucleus sampling: the smallest token set with this mass.")
    maxNewTokens: int = Field(256, ge=1, le=4096, description="The most tokens generated per example.")
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="Seed of the prompt sampling and of generation: same inputs and seed, same candidates.")


class SelfInstruct(ApiModel):
    """Self-Instruct-style generation: few-shot prompts of seed examples sampled at random."""

    fewShot: int = Field(3, ge=1, le=16, description="Seed examples per prompt.")
    template: Optional[str] = Field(
        None, min_length=1, max_length=16384,
        description="The prompt, with the placeholders {examples} (the sampled seed examples), {n_seeds} (how "
        "many) and {n} (n_seeds + 1); the generator continues it with an instruction, then \"Response:\" and "
        "the response. Unset: a documented default (docs/synthetic-data.md). Its digest is in every example's "
        "lineage.")
    maxAttempts: int = Field(
        4, ge=1, le=100,
        description="Generation attempts per requested example before the Job stops short: filters may reject "
        "most of what a weak generator writes.")


class NoveltyFilter(ApiModel):
    """Drop candidates too close to a seed or to an example already kept (Self-Instruct's ROUGE-L rule)."""

    maxRougeL: float = Field(0.7, gt=0, le=1,
                             description="A candidate is kept only if its ROUGE-L F-measure against every seed "
                             "and every kept candidate is below this.")


class JudgeFilter(ApiModel):
    """An optional model that scores each candidate against a rubric."""

    rubric: str = Field(..., min_length=1, max_length=8192,
                        description="The rubric prompt; the judge answers with a score from 1 to 10.")
    minScore: float = Field(6, ge=1, le=10, description="Candidates scoring below this are dropped.")
    model: Optional[BaseModelRef] = Field(None, description="The judge model; unset: the generator itself.")


class SynthesisFilters(ApiModel):
    """The filters a candidate must pass before review, each counted in status."""

    novelty: NoveltyFilter = Field(default_factory=NoveltyFilter, description="ROUGE-L novelty vs seeds and pool.")
    pii: bool = Field(True, description="Scan for PII and apply the curation's piiPolicy (reject drops the "
                      "candidate, redact redacts it, allow keeps it).")
    judge: Optional[JudgeFilter] = Field(None, description="Score each candidate with a judge model.")


class ReviewSettings(ApiModel):
    """Which candidates people must review, and how many must be good."""

    fraction: float = Field(
        1.0, gt=0, le=1,
        description="Fraction of the filtered candidates sampled (deterministically, by sampling.seed) for "
        "review; 1 reviews all. Candidates not sampled are included when the review passes, with lineage "
        "review: not-sampled.")
    minAcceptanceRate: float = Field(
        0.8, ge=0, le=1,
        description="Accepted (or edited) / reviewed: below it, when every sampled candidate is reviewed, the "
        "SyntheticDataset is Invalid (reason LowAcceptance) with the numbers.")


class SyntheticDatasetSpec(ApiModel):
    """The desired synthetic data."""

    seed: SeedRef = Field(..., description="The seed Dataset.")
    generator: GeneratorRef = Field(..., description="The model that writes the examples.")
    examples: int = Field(..., ge=1, le=100000, description="How many candidates to generate (before review).")
    format: SyntheticFormat = Field("chat", description="Format of the generated examples (chat, instruction "
                                    "or completion).")
    selfInstruct: SelfInstruct = Field(default_factory=SelfInstruct, description="The generation method.")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="Sampling parameters.")
    filters: SynthesisFilters = Field(default_factory=SynthesisFilters, description="Filters before review.")
    review: ReviewSettings = Field(default_factory=ReviewSettings, description="Human review.")
    curation: Curation = Field(
        default_factory=Curation,
        description="Curation of the candidates (near-duplicates, quality, decontamination against the seed's "
        "evaluation split, piiPolicy) and of the resulting Dataset, which validates with these settings.")
    evaluation: EvaluationSplit = Field(
        default_factory=lambda: EvaluationSplit(fraction=0.1),
        description="The resulting Dataset's held-out split.")
    output: Optional[DatasetOutput] = Field(
        None, description="Folder for the work files and the reviewed data; defaults to the operator's artifact store.")
    resources: Optional[ResourceSettings] = Field(
        None, description="Resources of the generation Job (one pod). Unset: CPU only (gpusPerNode 0), the "
        "operator's validation CPU and memory.")


# --- what the Jobs write and read (work folder files) ---------------------------------------------------

class Lineage(ApiModel):
    """Where one synthetic example came from; in its line's metadata as `synthetic.*` keys."""

    syntheticDataset: str = Field(..., description="namespace/name of the SyntheticDataset.")
    seedDigest: str = Field(..., pattern=DIGEST_PATTERN, description="Digest of the seed Dataset's validated data.")
    baseModelDigest: str = Field(..., pattern=DIGEST_PATTERN, description="Digest of the generator's base model folder.")
    generatorAdapterDigest: Optional[str] = Field(
        None, pattern=DIGEST_PATTERN, description="Digest of the generator adapter (a FineTuneJob's), if any.")
    templateDigest: str = Field(..., pattern=DIGEST_PATTERN, description="sha256 of the prompt template text.")
    seedIds: list[str] = Field(default_factory=list, max_length=16,
                               description="Ids (line digests) of the seed examples in the prompt.")


class SyntheticCandidate(ApiModel):
    """One line of candidates.jsonl."""

    id: str = Field(..., pattern=r"^[a-f0-9]{16}$",
                    description="First 16 hex digits of the sha256 of the example's canonical JSON.")
    example: dict = Field(..., description="The example, in the spec's format (a Dataset line, no metadata).")
    lineage: Lineage
    scores: dict[str, float] = Field(default_factory=dict,
                                     description="Filter scores: rougeL (max against seeds and pool), judge, ...")
    reviewRequired: bool = Field(True, description="Sampled for review (review.fraction).")


class ReviewDecision(ApiModel):
    """reviews/<id>.json: what one person decided about one candidate."""

    id: str = Field(..., pattern=r"^[a-f0-9]{16}$")
    verdict: ReviewVerdict
    example: Optional[dict] = Field(None, description="The edited example (verdict edited).")
    reviewer: str = Field(..., min_length=1, max_length=256)
    at: str = Field(..., description="RFC 3339 time of the decision.")
    via: Literal["ftctl", "import"] = "ftctl"
    note: str = Field("", max_length=4096)


class GenerationStats(ApiModel):
    """Counts of the generation Job."""

    requested: int = Field(0, ge=0, description="Candidates asked for (spec.examples).")
    generated: int = Field(0, ge=0, description="Outputs the generator produced (including unparseable ones).")
    kept: int = Field(0, ge=0, description="Candidates that passed every filter.")
    removed: dict[str, int] = Field(
        default_factory=dict,
        description="Removed per filter: unparseable, exactDuplicate, nearDuplicate, novelty, quality, pii, "
        "decontamination, judge.")
    reviewRequired: int = Field(0, ge=0, description="Candidates sampled for review.")


class GenerationReport(GenerationStats):
    """generation.json."""

    lineage: Lineage
    candidatesDigest: str = Field(..., pattern=DIGEST_PATTERN, description="sha256 of candidates.jsonl.")
    examplesRemoved: dict[str, list[str]] = Field(
        default_factory=dict, description="Up to 5 clipped texts per filter, to show what was removed.")


class ReviewStats(ApiModel):
    """Where the review stands (status.review, review.json)."""

    required: int = Field(0, ge=0, description="Candidates sampled for review.")
    reviewed: int = Field(0, ge=0, description="Of those, reviewed.")
    accepted: int = Field(0, ge=0, description="Accepted as they were.")
    edited: int = Field(0, ge=0, description="Accepted after an edit.")
    rejected: int = Field(0, ge=0, description="Rejected.")
    pending: int = Field(0, ge=0, description="Sampled and not yet reviewed.")
    acceptanceRate: Optional[float] = Field(None, ge=0, le=1, description="(accepted + edited) / reviewed.")


class SynthesisInputs(ApiModel):
    """What the operator resolved for the Jobs."""

    seedURI: str = Field(..., pattern=URI_PATTERN, description="Folder with the seed's train.jsonl and eval.jsonl.")
    seedFormat: SyntheticFormat
    seedDigest: str = Field(..., pattern=DIGEST_PATTERN)
    seedLicense: Optional[str] = None
    baseModel: BaseModelRef
    adapterURI: Optional[str] = Field(None, pattern=URI_PATTERN)
    adapterDigest: Optional[str] = Field(None, pattern=DIGEST_PATTERN)
    evalSetURIs: list[str] = Field(default_factory=list, description="Decontaminate against these files too.")


class SynthesisConfig(ApiModel):
    """Input of `finetune-trainer synthesize` and `finetune-trainer synthesis-finalize`."""

    namespace: str
    name: str
    spec: SyntheticDatasetSpec
    inputs: SynthesisInputs
    workURI: str = Field(..., pattern=URI_PATTERN, description="The work folder of this generation.")


# --- status ---------------------------------------------------------------------------------------------

class SyntheticDatasetStatus(ApiModel):
    """Observed state of a SyntheticDataset."""

    phase: SyntheticPhase = Field("Pending", description="Pending, WaitingForInputs, Generating, Reviewing, "
                                  "Finalizing, Ready, Invalid or Failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Standard conditions: Ready (the Dataset exists and is Ready), Reconciling, Stalled, and "
        "ReviewPending (True while sampled candidates await review; the message has the counts).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    observedGeneration: int = Field(0, ge=0, description="The generation the status describes.")
    workURI: Optional[str] = Field(None, description="The work folder (candidates, reviews, reviewed data).")
    generation: Optional[GenerationStats] = Field(None, description="What the generation Job produced and removed.")
    review: Optional[ReviewStats] = Field(None, description="Where the review stands.")
    lineage: Optional[Lineage] = Field(None, description="Digests of the seed, the generator and the template.")
    dataset: Optional[str] = Field(None, description="The Dataset made from the reviewed examples.")
    job: Optional[str] = Field(None, description="The current (or last) Job.")
    message: str = Field("", description="A human-readable summary of the current phase.")


class SyntheticDataset(Resource):
    """Synthetic training data grown from a seed Dataset by a generator model, filtered and reviewed by people."""

    KIND: ClassVar[str] = "SyntheticDataset"
    PLURAL: ClassVar[str] = "syntheticdatasets"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ftsyn",)
    # Jobs and the child Dataset carry the name in labels (<= 63).
    NAME_MAX_LENGTH: ClassVar[int] = 63
    PRINTER_COLUMNS: ClassVar[tuple[dict, ...]] = (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Seed", "type": "string", "jsonPath": ".spec.seed.dataset"},
        {"name": "Kept", "type": "integer", "jsonPath": ".status.generation.kept"},
        {"name": "Pending", "type": "integer", "jsonPath": ".status.review.pending"},
        {"name": "Accepted", "type": "number", "jsonPath": ".status.review.acceptanceRate", "priority": 1},
        age_column(),
    )

    kind: Literal["SyntheticDataset"] = Field("SyntheticDataset", description="SyntheticDataset")
    spec: SyntheticDatasetSpec = Field(..., description="The desired synthetic data.")
    status: Optional[SyntheticDatasetStatus] = Field(None, description="Observed state, written by the operator.")


__all__ = ["SyntheticDataset", "SyntheticDatasetSpec", "SyntheticDatasetStatus", "SynthesisConfig",
           "SyntheticCandidate", "ReviewDecision", "ReviewStats", "GenerationReport", "Lineage",
           "DEFAULT_TEMPLATE"]

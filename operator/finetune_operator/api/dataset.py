"""Dataset: training data, its format, provenance and curation."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import ClassVar, Literal, Optional

from pydantic import Field

from .curation import CurationStats, Decontamination, NearDuplicates, QualityFilters
from .images import ImageStandardisation, ImageStats
from .meta import DIGEST_PATTERN, DNS_SUBDOMAIN_PATTERN, ApiModel, Condition, Resource, SecretRef, URI_PATTERN, age_column

# Data formats follow the usual JSONL conventions; the trainer's formats module parses them.
# New formats (e.g. image-text) are added there and here, nowhere else.
DataFormat = Literal["chat", "instruction", "completion", "image-text"]
PIIPolicy = Literal["reject", "redact", "allow"]
Consent = Literal["obtained", "not-required", "unknown"]
DatasetPhase = Literal["Pending", "Validating", "Ready", "Invalid", "Failed"]


#: A byte count as a Kubernetes quantity: digits, an optional fraction, an optional decimal (k, M, G, T) or
#: binary (Ki, Mi, Gi, Ti) suffix; not zero (some digit is 1-9). RE2 syntax, as the API server runs it.
BYTES_QUANTITY_PATTERN = r"^([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*)(k|Ki|M|Mi|G|Gi|T|Ti)?$"
_BYTE_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def byte_quantity(text: str) -> int:
    """Bytes in a quantity matching BYTES_QUANTITY_PATTERN ("10Gi", "1.5M", "1000"), rounded up."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    if not m or m.group(2) not in _BYTE_UNITS:
        raise ValueError(f"{text!r} is not a byte quantity such as 10Gi, 500Mi or 1000000")
    return max(1, math.ceil(Decimal(m.group(1)) * _BYTE_UNITS[m.group(2)]))


class DataSource(ApiModel):
    """Where the raw data lives."""

    uri: str = Field(
        ..., pattern=URI_PATTERN, max_length=2048,
        description="JSONL file (or a folder of *.jsonl files) at s3://bucket/key or file://path.")
    credentials: Optional[SecretRef] = Field(None, description="Secret with S3 credentials for this source.")
    maxBytes: str = Field(
        "10Gi", pattern=BYTES_QUANTITY_PATTERN, max_length=32,
        description="The most bytes validation reads from the source, as a quantity string (\"10Gi\", "
        "\"500Mi\", \"2G\", \"1000000\"): all the files of a folder together, and a separate evaluation.uri "
        "file on its own. A larger source is Invalid (reason SourceTooLarge) and reading stops there, so an "
        "endless or runaway source cannot exhaust the validation Job. The source is read as JSON Lines, "
        "streamed: lines end at \"\\n\" only (CRLF is accepted; U+2028 inside a string is text), a line may "
        "be at most 8 MiB, a UTF-8 byte order mark at the start of a file is accepted, and a gzip, zip, bzip2, "
        "xz or zstd file is refused (reason NotJSONLines) with a message saying so: decompress it first.")

    def max_bytes(self) -> int:
        return byte_quantity(self.maxBytes)


class EvaluationSplit(ApiModel):
    """The held-out split used for eval loss and governance: a fraction of the data, or a separate file."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {"x-kubernetes-validations": [{
            "rule": "has(self.fraction) != has(self.uri)",
            "message": "set exactly one of evaluation.fraction or evaluation.uri",
        }]}
    }

    fraction: Optional[float] = Field(
        None, gt=0, lt=1, description="Fraction of the examples held out for evaluation, in (0, 1).")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed of the deterministic split, so every run holds out the same examples.")
    uri: Optional[str] = Field(
        None, pattern=URI_PATTERN, max_length=2048,
        description="A separate JSONL evaluation file in the same format, instead of a fraction.")


class SyntheticOrigin(ApiModel):
    """The chain behind a Dataset made by a SyntheticDataset (set by the operator on its child Dataset)."""

    syntheticDataset: str = Field(..., min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_PATTERN,
                                  description="The SyntheticDataset (same namespace) that made this Dataset.")
    seedDataset: str = Field(..., min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_PATTERN,
                             description="The seed Dataset it grew from.")
    seedDigest: str = Field(..., pattern=DIGEST_PATTERN, description="Digest of the seed's validated data.")
    baseModelDigest: str = Field(..., pattern=DIGEST_PATTERN, description="Digest of the generator's base model.")
    generatorAdapterDigest: Optional[str] = Field(
        None, pattern=DIGEST_PATTERN, description="Digest of the generator adapter, when a FineTuneJob's.")
    templateDigest: str = Field(..., pattern=DIGEST_PATTERN, description="sha256 of the prompt template.")
    candidatesDigest: str = Field(..., pattern=DIGEST_PATTERN, description="sha256 of candidates.jsonl.")
    reviewURI: str = Field(..., pattern=URI_PATTERN, max_length=2048,
                           description="The review.json the reviewed file was made from.")


class Provenance(ApiModel):
    """Where the data came from; checked by the provenance governance check."""

    origin: str = Field(..., min_length=1, max_length=1024,
                        description="Where the data came from (a system, a URL, a team, a vendor).")
    license: Optional[str] = Field(
        None, min_length=1, max_length=256,
        description="SPDX license id (e.g. CC-BY-4.0, Apache-2.0) or a free-form license name.")
    collectedBy: Optional[str] = Field(None, max_length=256, description="Who collected or produced the data.")
    consent: Consent = Field(
        "unknown", description="Whether the people in the data consented: obtained, not-required or unknown.")
    containsPersonalData: bool = Field(False, description="Whether the data contains personal data about people.")
    synthetic: Optional[SyntheticOrigin] = Field(
        None, description="Set when the data was generated (by a SyntheticDataset): the seed, generator and "
        "template digests and the review, which the provenance check verifies line by line.")


class Curation(ApiModel):
    """What the validation Job does to the data besides checking it."""

    deduplicate: bool = Field(True, description="Remove exact duplicate examples.")
    minExamples: int = Field(10, ge=1, description="A Dataset with fewer valid training examples is Invalid.")
    maxInvalidLines: int = Field(
        0, ge=0, description="How many malformed lines are tolerated (dropped) before the Dataset is Invalid.")
    piiPolicy: PIIPolicy = Field(
        "reject", description="What to do with PII found in the data: reject the Dataset, redact it, or allow it.")
    # The curation steps (api/curation.py, docs/datasets.md): each is off until its object is present.
    nearDuplicates: Optional[NearDuplicates] = Field(
        None, description="Remove near-duplicates (MinHash LSH), keeping the first of each cluster.")
    quality: Optional[QualityFilters] = Field(
        None, description="Quality filters: token lengths, empty or placeholder answers, repetition, one answer "
        "given to many prompts.")
    decontamination: Optional[Decontamination] = Field(
        None, description="Remove training examples whose n-grams overlap the evaluation data.")
    tokenizerURI: Optional[str] = Field(
        None, pattern=URI_PATTERN, max_length=2048,
        description="Folder with the base model's tokenizer.json: token counts (stats, length filters) are exact. "
        "Unset: an estimate of one token per 4 non-whitespace characters.")
    recommendedExamples: int = Field(
        5000, ge=0, description="Below this many training examples the Ready Dataset gets the warning condition "
        "SmallDataset=True (not a failure).")
    images: Optional[ImageStandardisation] = Field(
        None, description="format image-text: write resized, re-encoded copies of the images beside the validated "
        "JSONL (its lines then point at the copies); unset: the lines point at the source images.")


class DatasetOutput(ApiModel):
    """Where the validated data and the validation report are written."""

    uri: str = Field(..., pattern=URI_PATTERN, max_length=2048,
                     description="Folder (s3://… or file://…) for the cleaned data and the report.")
    credentials: Optional[SecretRef] = Field(None, description="Secret with S3 credentials for the output.")


class DatasetSpec(ApiModel):
    """The desired Dataset."""

    source: DataSource = Field(..., description="Where the raw data is.")
    format: DataFormat = Field(
        ..., description="chat: {\"messages\": [{\"role\", \"content\"}]}; instruction: {\"instruction\", "
        "\"input\" (optional), \"output\"}; completion: {\"prompt\", \"completion\"}; image-text: chat lines whose content may be a list of parts, "
        "{\"type\": \"text\", \"text\"} or {\"type\": \"image\", \"image\": URI} (s3://, file:// or a path relative to "
        "the source's folder), every image checked and digested (docs/multimodal.md).")
    evaluation: EvaluationSplit = Field(
        default_factory=lambda: EvaluationSplit(fraction=0.1), description="The held-out evaluation split.")
    provenance: Provenance = Field(..., description="Where the data came from, its license and consent.")
    curation: Curation = Field(default_factory=Curation, description="Validation and curation options.")
    output: Optional[DatasetOutput] = Field(
        None, description="Where validated data goes; defaults to the operator's artifact store.")


class DatasetStats(ApiModel):
    """Counts from the last validation."""

    examples: int = Field(0, ge=0, description="Valid training examples after curation.")
    evalExamples: int = Field(0, ge=0, description="Examples in the evaluation split.")
    tokens: int = Field(0, ge=0, description="Tokens in the validated data (whitespace-free estimate or tokenizer count).")
    duplicatesRemoved: int = Field(0, ge=0, description="Exact duplicates removed.")
    invalidLines: int = Field(0, ge=0, description="Malformed lines found.")
    curation: Optional[CurationStats] = Field(None, description="What the curation steps removed, and data stats.")
    images: Optional[ImageStats] = Field(None, description="format image-text: formats, modes and sizes of the images.")


class DatasetStatus(ApiModel):
    """Observed state of a Dataset."""

    phase: DatasetPhase = Field("Pending", description="Pending, Validating, Ready, Invalid or Failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Standard conditions: Ready (True once validated), Reconciling (validation in progress; "
                    "reason = the phase), Stalled (Invalid or Failed until the spec or the data changes); "
                    "see docs/gitops.md.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    observedGeneration: int = Field(0, ge=0, description="The generation the status describes.")
    stats: Optional[DatasetStats] = Field(None, description="Counts from the last validation.")
    digest: Optional[str] = Field(None, pattern=DIGEST_PATTERN, description="sha256 of the validated content.")
    validatedURI: Optional[str] = Field(None, description="Where the validated (cleaned) data is.")
    reportURI: Optional[str] = Field(None, description="Where the validation report is.")
    piiFindings: dict[str, int] = Field(default_factory=dict, description="PII findings by kind (email, phone, …).")
    invalidLineNumbers: list[int] = Field(default_factory=list, description="The first offending line numbers.")
    validationJob: Optional[str] = Field(None, description="Name of the validation Job.")
    message: str = Field("", description="A human-readable summary of the current phase.")


class Dataset(Resource):
    """Training data for fine-tuning: source, format, provenance and curation."""

    KIND: ClassVar[str] = "Dataset"
    PLURAL: ClassVar[str] = "datasets"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ftds",)
    # The operator labels its Jobs with this name (finetune.dev/...: <name>): label values are <= 63.
    NAME_MAX_LENGTH: ClassVar[int] = 63
    PRINTER_COLUMNS: ClassVar[tuple[dict, ...]] = (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Format", "type": "string", "jsonPath": ".spec.format"},
        {"name": "Examples", "type": "integer", "jsonPath": ".status.stats.examples"},
        {"name": "Digest", "type": "string", "jsonPath": ".status.digest", "priority": 1},
        age_column(),
    )

    kind: Literal["Dataset"] = Field("Dataset", description="Dataset")
    spec: DatasetSpec = Field(..., description="The desired Dataset.")
    status: Optional[DatasetStatus] = Field(None, description="Observed state, written by the operator.")

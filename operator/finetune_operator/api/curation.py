"""Dataset curation settings (`spec.curation`'s steps) and the bounded stats they report.

Each step is off until its object is present (`nearDuplicates: {}` turns it on with the defaults),
so a Dataset written before these steps existed validates to the same files and digest.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field

from .meta import ApiModel, URI_PATTERN

#: Placeholder answers removed by the quality filter unless `quality.placeholders` says otherwise
#: (compared after lower-casing and stripping punctuation and whitespace).
DEFAULT_PLACEHOLDERS = ("n/a", "na", "none", "null", "todo", "tbd", "lorem ipsum", "...", "-", "?", "answer",
                        "placeholder", "xxx", "test")

#: Curation steps, in the order they run; `removed.jsonl` and status name the step that removed a line.
STEPS = ("exactDuplicate", "promptLength", "answerLength", "emptyAnswer", "repetition", "nearDuplicate",
         "sameAnswer", "decontamination")

#: Bounds of what status holds (the whole list is in report.json and removed.jsonl).
MAX_STATUS_LINES = 10
MAX_STATUS_EXAMPLES = 3
MAX_STATUS_GROUPS = 20
MAX_EVAL_SETS = 8
#: The spec's evaluation files and the policies' together (each list at most MAX_EVAL_SETS).
MAX_EVAL_SETS_USED = 2 * MAX_EVAL_SETS

_URI = Annotated[str, Field(pattern=URI_PATTERN, max_length=2048)]


class NearDuplicates(ApiModel):
    """MinHash LSH near-duplicate removal (datasketch): the first example of each cluster is kept."""

    threshold: float = Field(
        0.7, ge=0.3, le=1.0,
        description="Jaccard similarity of two examples' word sets (lower-cased, punctuation dropped, the "
        "prompt and the answer together) at or above which the later one is a near-duplicate and removed. "
        "Word sets ignore order, so re-ordered words, case and whitespace variants are similarity 1.")
    numPerm: int = Field(128, ge=32, le=512,
                         description="MinHash permutations: more is a closer similarity estimate and more memory "
                         "(~5 KB per example kept at 128: the signature and the LSH tables).")


class QualityFilters(ApiModel):
    """Per-example quality filters; a removed example is listed with the filter that removed it."""

    minPromptTokens: int = Field(0, ge=0, description="Fewest tokens in the prompt (every non-assistant message).")
    maxPromptTokens: Optional[int] = Field(None, ge=1, description="Most tokens in the prompt; unset: no bound.")
    minAnswerTokens: int = Field(1, ge=0, description="Fewest tokens in the answer (the assistant messages).")
    maxAnswerTokens: Optional[int] = Field(None, ge=1, description="Most tokens in the answer; unset: no bound.")
    placeholders: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=lambda: list(DEFAULT_PLACEHOLDERS), max_length=256,
        description="Answers that are placeholders, not answers (compared lower-cased without punctuation or "
        "whitespace); an answer that is empty after that is removed too.")
    maxRepeatedNgramRatio: float = Field(
        0.5, gt=0, le=1,
        description="Largest share of an answer's word n-grams that may be repeats of an earlier n-gram of the same "
        "answer (\"the cat the cat the cat\": 3-grams 4, repeats 2, ratio 0.5). Answers with fewer than "
        "10 words are not judged.")
    repetitionNgram: int = Field(3, ge=1, le=10, description="n of the repeated n-gram ratio.")
    maxPromptsPerAnswer: int = Field(
        20, ge=0,
        description="An answer given, word for word (after lower-casing), to more than this many different prompts "
        "is boilerplate: every example with it is removed. 0 turns the filter off (e.g. for classification "
        "data whose answers are labels).")
    minAnswerWordsForSameAnswer: int = Field(
        4, ge=1, description="Only answers of at least this many words count for maxPromptsPerAnswer (short "
        "labels such as \"yes\" are expected to repeat).")


class Decontamination(ApiModel):
    """Remove training examples that overlap the evaluation data (so eval is not measured on training data)."""

    ngram: int = Field(8, ge=3, le=50, description="Word n-gram length (lower-cased, punctuation dropped).")
    maxOverlap: float = Field(
        0.5, gt=0, le=1,
        description="A training example whose share of n-grams found in the evaluation data is at or above this "
        "is removed. Examples shorter than n words compare as one n-gram (the whole text).")
    evalSetURIs: list[_URI] = Field(
        default_factory=list, max_length=MAX_EVAL_SETS,
        description="More evaluation files to decontaminate against (JSON Lines; every string value of a line is "
        "its text), besides this Dataset's evaluation split and the evalSetURI of the GovernancePolicies that "
        "apply to the namespace when the validation Job is created.")


class CurationStep(ApiModel):
    """What one curation step removed."""

    step: str = Field(..., description="The step: " + ", ".join(STEPS) + ".")
    removed: int = Field(0, ge=0, description="Examples removed by this step.")
    lines: list[int] = Field(default_factory=list, max_length=MAX_STATUS_LINES,
                             description=f"The first {MAX_STATUS_LINES} source line numbers removed.")
    examples: list[str] = Field(
        default_factory=list, max_length=MAX_STATUS_EXAMPLES,
        description="Why the first few were removed (line numbers and measures, never the data itself; report.json "
        "has bounded excerpts and removed.jsonl every line).")


class CountEntry(ApiModel):
    """A name and how many examples carry it."""

    name: str = Field(..., max_length=128, description="The value.")
    count: int = Field(0, ge=0, description="Examples with it.")


class HistogramBucket(ApiModel):
    """Examples whose token count is at most `le` (and above the previous bucket's)."""

    le: int = Field(..., ge=-1, description="Upper bound of the bucket in tokens (-1: no bound).")
    count: int = Field(0, ge=0, description="Training examples in the bucket.")


class CurationStats(ApiModel):
    """Bounded stats of the curation steps (the full record is report.json and removed.jsonl)."""

    settingsDigest: Optional[str] = Field(None, description="sha256 of the curation settings that ran.")
    steps: list[CurationStep] = Field(default_factory=list, max_length=len(STEPS),
                                      description="Per step that ran: how many examples it removed and which.")
    duplicates: dict[str, int] = Field(
        default_factory=dict, description="Duplicates removed by kind: exact, near, eval (of an evaluation example).")
    tokenHistogram: list[HistogramBucket] = Field(default_factory=list, max_length=24,
                                                  description="Token counts of the training examples.")
    sources: list[CountEntry] = Field(default_factory=list, max_length=MAX_STATUS_GROUPS,
                                      description="Training examples per metadata.source (the most common).")
    tags: list[CountEntry] = Field(default_factory=list, max_length=MAX_STATUS_GROUPS,
                                   description="Training examples per metadata.tags value (the most common).")
    evalSetURIs: list[str] = Field(default_factory=list, max_length=MAX_EVAL_SETS_USED,
                                   description="Evaluation files the training examples were decontaminated against.")
    removedURI: Optional[str] = Field(None, description="removed.jsonl: every removed line with its step.")
    tokenCount: str = Field("", description="How tokens were counted: the tokenizer's URI, or the estimate.")

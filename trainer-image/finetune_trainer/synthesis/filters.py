"""The filters a generated example must pass before review, as plain state and pure steps.

`CandidateFilter.consider(instruction, response)` runs, in order: PII (spec.curation.piiPolicy when
spec.filters.pii: reject drops, redact rewrites, allow keeps), exact duplicates (of a seed or a kept
candidate), quality (empty or placeholder answers always; spec.curation.quality's lengths and
repetition when set), decontamination (n-gram overlap with the seed's evaluation split and the other
evaluation files), novelty (ROUGE-L of the instruction against every seed and kept instruction, Self-
Instruct's rule), near-duplicates (MinHash LSH of the whole example against seeds and kept ones) and
the judge (a model's 1-10 score against the rubric, last: it is the costly one). Only a candidate that
passes them all enters the indexes later candidates are compared with. Every removal is counted per
filter, with the first few (clipped, PII-redacted) texts to show what was removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from finetune_operator.api.curation import Decontamination, NearDuplicates, QualityFilters
from finetune_operator.api.synthetic import SyntheticDatasetSpec

from .. import curation as cur
from .. import pii
from ..formats import Example, clip
from .novelty import NoveltyIndex
from .prompts import to_example

#: The filters, in the order they run; GenerationStats.removed is keyed by these.
FILTERS = ("unparseable", "pii", "exactDuplicate", "quality", "decontamination", "novelty", "nearDuplicate",
           "judge")
MAX_EXAMPLES_REMOVED = 5
EXAMPLE_CHARS = 160

#: A judge: (instruction, response) -> its score from 1 to 10, or None when the judge gave none.
Judge = Callable[[str, str], Optional[float]]


@dataclass
class Kept:
    example: dict
    scores: dict[str, float] = field(default_factory=dict)


def shown(instruction: str, response: str) -> str:
    return clip(pii.redact(f"Instruction: {instruction} Response: {response}"), EXAMPLE_CHARS)


class CandidateFilter:
    """The filter state of one generation: seeds and kept candidates indexed, counts of removals."""

    def __init__(self, spec: SyntheticDatasetSpec, seeds: Iterable[Example], eval_texts: Iterable[str],
                 count_text: Callable[[str], int], judge: Optional[Judge] = None):
        self.spec = spec
        self.fmt = spec.format
        self.pii_policy = spec.curation.piiPolicy if spec.filters.pii else None
        self.quality = spec.curation.quality
        self.placeholders = spec.curation.quality or QualityFilters()
        self.count_text = count_text
        if judge is not None and spec.filters.judge is None:
            raise ValueError("a judge needs spec.filters.judge (its rubric and minScore)")
        self.judge = judge
        self.min_score = spec.filters.judge.minScore if spec.filters.judge else None
        self.removed = {name: 0 for name in FILTERS if name != "judge" or judge is not None}
        self.examples_removed: dict[str, list[str]] = {}
        near = spec.curation.nearDuplicates or NearDuplicates()
        self._near = cur.NearDuplicateIndex(near.threshold, near.numPerm)
        self._overlap = cur.OverlapIndex(spec.curation.decontamination or Decontamination())
        for text in eval_texts:
            self._overlap.add(text)
        self._novelty = NoveltyIndex(spec.filters.novelty.maxRougeL)
        self._exact: set[tuple[str, str]] = set()
        self._keys = 0
        for seed in seeds:
            self._remember(cur.prompt_text(seed).strip(), cur.answer_text(seed).strip())

    # --- the record of removals

    def remove(self, step: str, text: str) -> None:
        self.removed[step] = self.removed.get(step, 0) + 1
        listed = self.examples_removed.setdefault(step, [])
        if len(listed) < MAX_EXAMPLES_REMOVED:
            listed.append(text)

    def unparseable(self, output: str) -> None:
        self.remove("unparseable", clip(pii.redact(output.strip()), EXAMPLE_CHARS))

    # --- the steps

    def _remember(self, instruction: str, response: str, signature=None) -> None:
        self._exact.add((instruction, response))
        self._novelty.add(instruction)
        self._near.add(self._keys, signature or self._near.signature(f"{instruction}\n{response}"))
        self._keys += 1

    def _pii(self, instruction: str, response: str) -> Optional[tuple[str, str]]:
        """The texts to keep (redacted with `redact`), or None when the policy rejects them."""
        if self.pii_policy is None or self.pii_policy == "allow":
            return instruction, response
        found = pii.find(instruction) or pii.find(response)
        if not found:
            return instruction, response
        if self.pii_policy == "reject":
            return None
        return pii.redact(instruction), pii.redact(response)

    def consider(self, instruction: str, response: str) -> Optional[Kept]:
        """The candidate as kept (in the spec's format, with its scores), or None with the removal counted."""
        instruction, response = instruction.strip(), response.strip()
        texts = self._pii(instruction, response)
        if texts is None:
            self.remove("pii", shown(instruction, response))
            return None
        instruction, response = texts
        text = shown(instruction, response)
        if (instruction, response) in self._exact:
            self.remove("exactDuplicate", text)
            return None
        example = to_example(instruction, response, self.fmt)
        parsed = Example((("user", instruction), ("assistant", response)), raw=self.fmt == "completion")
        problem = (cur.quality_check(parsed, self.quality, self.count_text) if self.quality is not None
                   else cur.placeholder_check(response, self.placeholders))
        if problem is not None:
            self.remove("quality", text)
            return None
        if self._overlap.check(f"{instruction}\n{response}") is not None:
            self.remove("decontamination", text)
            return None
        rouge = self._novelty.max_rouge(instruction)
        if rouge >= self._novelty.threshold:
            self.remove("novelty", text)
            return None
        signature = self._near.signature(f"{instruction}\n{response}")
        if self._near.match(signature) is not None:
            self.remove("nearDuplicate", text)
            return None
        scores = {"rougeL": round(rouge, 4)}
        if self.judge is not None:
            score = self.judge(instruction, response)
            if score is None or score < self.min_score:
                self.remove("judge", text)
                return None
            scores["judge"] = score
        self._remember(instruction, response, signature)
        return Kept(example, scores)

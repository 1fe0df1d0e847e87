"""Curation steps of the validation Job (`spec.curation`): plain checks and small indexes.

Each check takes an example (formats.Example) or its text and returns None (keep it) or a
`Removal` naming the step and why, so any pipeline can chain the same steps (validate.py does;
a synthetic-data filter can too). The stateful ones are indexes fed in stream order: the first
example of a cluster is kept, later ones are removed.

Text is compared as WORDS: lower-cased `\\w+` runs, punctuation and whitespace dropped
(`words`). So case and whitespace variants are the same text, and a word set (near-duplicates)
does not see word order at all.

- near-duplicates: MinHash (datasketch) of the example's word set (prompt and answer together),
  MinHash LSH for candidates, then the estimated Jaccard similarity of the two signatures must
  reach `threshold` (LSH alone lets through pairs well below it). Memory per example kept:
  numPerm * 4 bytes of signature plus datasketch's LSH tables, ~5.3 KB in all at numPerm 128
  (hack/bench/curation_bench.py): ~200,000 examples per GiB of the validation Job's memory.
- quality: token lengths of the prompt and the answer; an empty or placeholder answer; the
  repeated n-gram ratio of the answer; one answer (word for word) given to many prompts.
- decontamination: the share of an example's word n-grams found in the evaluation data.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import re
from array import array
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from finetune_operator.api.curation import (MAX_STATUS_EXAMPLES, MAX_STATUS_GROUPS, MAX_STATUS_LINES, STEPS,
                                            Decontamination, QualityFilters)

from .formats import Example, clip

_WORD = re.compile(r"\w+")
#: Examples listed in report.json per step (with a bounded, PII-redacted excerpt).
MAX_REPORT_EXAMPLES = 20
EXCERPT_CHARS = 160
#: Answers shorter than this many words are not judged for repetition (too little to measure).
MIN_WORDS_FOR_REPETITION = 10


@dataclass(frozen=True)
class Removal:
    """Why an example is removed: the step (api.curation.STEPS) and a detail without the data itself."""

    step: str
    detail: str
    of_line: Optional[int] = None  # the kept example it duplicates or overlaps, when there is one


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def prompt_text(example: Example) -> str:
    return "\n".join(content for role, content in example.messages if role != "assistant")


def answer_text(example: Example) -> str:
    return "\n".join(content for role, content in example.messages if role == "assistant")


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def estimate_text_tokens(text: str) -> int:
    """The documented approximation: one token per 4 non-whitespace characters, rounded up."""
    return math.ceil(len("".join(text.split())) / 4)


# ------------------------------------------------------------------------------------ quality


def length_check(prompt_tokens: int, answer_tokens: int, q: QualityFilters) -> Optional[Removal]:
    if prompt_tokens < q.minPromptTokens or (q.maxPromptTokens is not None and prompt_tokens > q.maxPromptTokens):
        return Removal("promptLength", f"prompt has {prompt_tokens} tokens (allowed {q.minPromptTokens}.."
                       f"{q.maxPromptTokens if q.maxPromptTokens is not None else 'any'})")
    if answer_tokens < q.minAnswerTokens or (q.maxAnswerTokens is not None and answer_tokens > q.maxAnswerTokens):
        return Removal("answerLength", f"answer has {answer_tokens} tokens (allowed {q.minAnswerTokens}.."
                       f"{q.maxAnswerTokens if q.maxAnswerTokens is not None else 'any'})")
    return None


def placeholder_check(answer: str, q: QualityFilters) -> Optional[Removal]:
    folded = " ".join(words(answer))
    if not folded:
        return Removal("emptyAnswer", "answer is empty or only punctuation")
    placeholders = {" ".join(words(p)) or p.strip().lower() for p in q.placeholders}
    if folded in placeholders or answer.strip().lower() in placeholders:
        return Removal("emptyAnswer", "answer is a placeholder")
    return None


def repeated_ngram_ratio(ws: list[str], n: int) -> float:
    """Share of the word n-grams that repeat an earlier n-gram of the same text (0: none repeat)."""
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def repetition_check(answer: str, q: QualityFilters) -> Optional[Removal]:
    ws = words(answer)
    if len(ws) < MIN_WORDS_FOR_REPETITION:
        return None
    ratio = repeated_ngram_ratio(ws, q.repetitionNgram)
    if ratio > q.maxRepeatedNgramRatio:
        return Removal("repetition", f"{ratio:.2f} of the answer's {q.repetitionNgram}-grams are repeats "
                       f"(max {q.maxRepeatedNgramRatio})")
    return None


def quality_check(example: Example, q: QualityFilters, count_text: Callable[[str], int]) -> Optional[Removal]:
    """The per-example quality filters, in order: lengths, empty or placeholder answer, repetition."""
    prompt, answer = prompt_text(example), answer_text(example)
    return (length_check(count_text(prompt) if prompt else 0, count_text(answer), q)
            or placeholder_check(answer, q) or repetition_check(answer, q))


class SameAnswerIndex:
    """Answers given, word for word (case and punctuation aside), to more than `limit` different
    prompts. Memory: per distinct answer a dict entry with its first prompt's key (most answers
    are given once); a set of at most limit + 1 prompt keys only for an answer seen with two."""

    def __init__(self, limit: int, min_words: int):
        self.limit, self.min_words = limit, min_words
        self._prompts: dict[int, int | set[int]] = {}

    def answer_key(self, answer: str) -> Optional[int]:
        ws = words(answer)
        return _key(" ".join(ws)) if self.limit > 0 and len(ws) >= self.min_words else None

    def add(self, prompt: str, answer: str) -> None:
        key = self.answer_key(answer)
        if key is None:
            return
        prompt_key = _key(" ".join(words(prompt)))
        seen = self._prompts.get(key)
        if seen is None:
            self._prompts[key] = prompt_key
        elif isinstance(seen, int):
            if seen != prompt_key:
                self._prompts[key] = {seen, prompt_key}
        elif len(seen) <= self.limit:
            seen.add(prompt_key)

    def boilerplate(self) -> set[int]:
        return {key for key, prompts in self._prompts.items()
                if (1 if isinstance(prompts, int) else len(prompts)) > self.limit}

    def check(self, answer: str, boilerplate: set[int]) -> Optional[Removal]:
        key = self.answer_key(answer)
        if key is not None and key in boilerplate:
            return Removal("sameAnswer", f"the same answer is given to more than {self.limit} different prompts")
        return None


# ------------------------------------------------------------------------------------ near-duplicates


class NearDuplicateIndex:
    """MinHash LSH over word sets; `match_or_add` keeps the first of each cluster."""

    def __init__(self, threshold: float, num_perm: int = 128):
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self._template = MinHash(num_perm=num_perm, seed=1)
        self._minhash = MinHash
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: dict[int, array] = {}

    def signature(self, text: str):
        ws = set(words(text)) or {text.strip().lower()}
        m = self._minhash(num_perm=self.num_perm, permutations=self._template.permutations, scheme="affine32")
        m.update_batch([w.encode("utf-8", "surrogatepass") for w in sorted(ws)])
        return m

    def match(self, signature) -> Optional[tuple[int, float]]:
        """The most similar indexed key at or above the threshold, and its estimated Jaccard."""
        import numpy as np

        best: Optional[tuple[int, float]] = None
        values = signature.hashvalues
        for key in self._lsh.query(signature):
            similarity = float(np.mean(np.frombuffer(self._signatures[key], dtype=np.uint32) == values))
            if similarity >= self.threshold and (best is None or similarity > best[1] or
                                                 (similarity == best[1] and key < best[0])):
                best = (key, similarity)
        return best

    def add(self, key: int, signature) -> None:
        self._lsh.insert(key, signature, check_duplication=False)
        self._signatures[key] = array("I", signature.hashvalues.astype("uint32").tobytes())

    def match_or_add(self, key: int, text: str) -> Optional[tuple[int, float]]:
        signature = self.signature(text)
        found = self.match(signature)
        if found is None:
            self.add(key, signature)
        return found


# ------------------------------------------------------------------------------------ decontamination


def ngram_keys(text: str, n: int) -> set[int]:
    ws = words(text)
    if not ws:
        return set()
    if len(ws) < n:
        return {_key(" ".join(ws))}
    return {_key(" ".join(ws[i:i + n])) for i in range(len(ws) - n + 1)}


def record_text(obj: object) -> str:
    """Every string value of a parsed JSON line, in order (an eval set of {"prompt", "answer"}, or a
    Dataset line of any format): the text decontamination compares."""
    out, stack = [], [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            # an image part's type, URI and digests are not text (image-text lines)
            stack.extend(reversed([v for k, v in item.items()
                                   if k not in ("metadata", "role", "type", "image", "sha256", "sourceSha256")]))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return "\n".join(out)


class OverlapIndex:
    """The word n-grams of the evaluation data (64-bit keys)."""

    def __init__(self, settings: Decontamination):
        self.n, self.max_overlap = settings.ngram, settings.maxOverlap
        self._grams: set[int] = set()
        self.texts = 0

    def add(self, text: str) -> None:
        self._grams |= ngram_keys(text, self.n)
        self.texts += 1

    def check(self, text: str) -> Optional[Removal]:
        grams = ngram_keys(text, self.n)
        if not grams or not self._grams:
            return None
        share = len(grams & self._grams) / len(grams)
        if share >= self.max_overlap:
            return Removal("decontamination", f"{share:.2f} of its {self.n}-grams are in the evaluation data "
                           f"(max {self.max_overlap})")
        return None


# ------------------------------------------------------------------------------------ the record


def settings_digest(curation_settings: dict) -> str:
    text = json.dumps(curation_settings, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class RemovalLog:
    """Every removed line, one JSON object each in removed.jsonl (line, file, step, detail, ofLine),
    and the bounded summary: counts per step, the first line numbers, a few examples."""

    def __init__(self, path, redact: Callable[[str], str]):
        self._out = open(path, "w", encoding="utf-8")
        self._redact = redact
        self.counts: dict[str, int] = {}
        self.lines: dict[str, list[int]] = {}
        self.examples: dict[str, list[dict]] = {}
        self.duplicates = {"exact": 0, "near": 0, "eval": 0}

    def add(self, line: int, removal: Removal, *, text: str = "", file: Optional[str] = None,
            kind: Optional[str] = None) -> None:
        entry = {"line": line, "step": removal.step, "detail": removal.detail}
        if file:
            entry["file"] = file
        if removal.of_line is not None:
            entry["ofLine"] = removal.of_line
        self._out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.counts[removal.step] = self.counts.get(removal.step, 0) + 1
        lines = self.lines.setdefault(removal.step, [])
        if len(lines) < MAX_STATUS_LINES:
            lines.append(line)
        listed = self.examples.setdefault(removal.step, [])
        if len(listed) < MAX_REPORT_EXAMPLES:
            listed.append({**entry, "excerpt": clip(self._redact(text), EXCERPT_CHARS)})
        if kind:
            self.duplicates[kind] += 1

    def close(self) -> None:
        self._out.close()

    def steps(self, ran: Iterable[str]) -> list[dict]:
        """Per step that ran (in STEPS order): count, first lines, and status-safe examples."""
        ran = set(ran)
        out = []
        for step in STEPS:
            if step not in ran:
                continue
            out.append({"step": step, "removed": self.counts.get(step, 0), "lines": self.lines.get(step, []),
                        "examples": [describe(e) for e in self.examples.get(step, [])[:MAX_STATUS_EXAMPLES]]})
        return out


def describe(entry: dict) -> str:
    """A removal in words, without the data: what status shows."""
    where = f"line {entry['line']}"
    of = f" (of line {entry['ofLine']})" if "ofLine" in entry else ""
    return clip(f"{where}: {entry['detail']}{of}", 240)


class TokenHistogram:
    """Counts of examples per token-count bucket: <=8, <=16, ... <=8192, and above."""

    BOUNDS = tuple(2 ** k for k in range(3, 14))

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)

    def add(self, tokens: int) -> None:
        for i, bound in enumerate(self.BOUNDS):
            if tokens <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def buckets(self) -> list[dict]:
        bounds = list(self.BOUNDS) + [-1]
        return [{"le": b, "count": c} for b, c in zip(bounds, self.counts) if c]


class TopCounts:
    """How many examples carry each value; the most common MAX_STATUS_GROUPS are reported. At most
    `limit` distinct values are tracked (the rest are counted under "(other)")."""

    def __init__(self, limit: int = 10_000):
        self.counts: dict[str, int] = {}
        self.limit = limit

    def add(self, value: object) -> None:
        if value is None:
            return
        name = clip(str(value), 120)
        if name not in self.counts and len(self.counts) >= self.limit:
            name = "(other)"
        self.counts[name] = self.counts.get(name, 0) + 1

    def top(self, n: int = MAX_STATUS_GROUPS) -> list[dict]:
        return [{"name": k, "count": v} for k, v in heapq.nsmallest(n, self.counts.items(), key=lambda kv: (-kv[1], kv[0]))]

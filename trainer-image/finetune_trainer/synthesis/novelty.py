"""Self-Instruct's novelty rule: a candidate's ROUGE-L F-measure against every seed and every kept
candidate must be below a threshold (0.7 by default).

Exact scores come from Google's `rouge-score` package (its tokenizer: lower-cased alphanumeric words).
Scoring a candidate against the whole pool is quadratic in the pool size and the LCS itself is pure
Python, so a cheap upper bound decides most pairs first: the LCS of two token sequences is at most the
size of their multiset intersection m, hence F = 2·LCS/(len(a)+len(b)) <= 2m/(len(a)+len(b)). An
inverted index over tokens yields m for every pool text sharing a token (texts sharing none score 0),
and the exact LCS is computed only while a bound can still beat the best score found (branch and
bound, highest bounds first), so the maximum is exact (hack/bench/novelty_bench.py measures it).
"""

from __future__ import annotations

from array import array
from collections import Counter


class _CachedTokenizer:
    """rouge-score's default tokenizer, memoized: every pool text is scored many times."""

    def __init__(self) -> None:
        from rouge_score import tokenizers

        self._inner = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._cache: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        tokens = self._cache.get(text)
        if tokens is None:
            tokens = self._cache[text] = self._inner.tokenize(text)
        return tokens


class NoveltyIndex:
    """The pool (seeds, then kept candidates); `max_rouge` is the largest ROUGE-L F against it.

    Postings per token are two growing int32 arrays (pool index, count in that text), read by numpy without
    copying, so the shared-token sums over the whole pool are vectorized."""

    def __init__(self, threshold: float):
        from rouge_score import rouge_scorer

        self.threshold = threshold
        self._tokenizer = _CachedTokenizer()
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=self._tokenizer)
        self._texts: list[str] = []
        self._lengths = array("i")
        self._postings: dict[str, tuple[array, array]] = {}
        self.exact_scored = 0  # pairs the bound could not decide (for the benchmark)

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, text: str) -> None:
        counts = Counter(self._tokenizer.tokenize(text))
        index = len(self._texts)
        self._texts.append(text)
        self._lengths.append(sum(counts.values()))
        for token, n in counts.items():
            ids, ns = self._postings.setdefault(token, (array("i"), array("i")))
            ids.append(index)
            ns.append(n)

    def max_rouge(self, text: str) -> float:
        """The largest ROUGE-L F of `text` against the pool: branch and bound over the pool texts by
        their upper bound, highest first; the search ends when no bound left can beat the best exact
        score, or once a score reaches the threshold (the candidate is out: the exact maximum no
        longer matters)."""
        import numpy as np

        tokens = self._tokenizer.tokenize(text)
        if not tokens or not self._texts:
            return 0.0
        shared = np.zeros(len(self._texts), dtype=np.int32)
        for token, n in Counter(tokens).items():
            posting = self._postings.get(token)
            if posting is not None:
                ids, ns = (np.frombuffer(a, dtype=np.int32) for a in posting)
                shared[ids] += np.minimum(ns, n)  # a text holds a token once in a posting: no repeated ids
        candidates = np.flatnonzero(shared)
        bounds = 2 * shared[candidates] / (len(tokens) + np.frombuffer(self._lengths, dtype=np.int32)[candidates])
        order = np.argsort(-bounds, kind="stable")
        best = 0.0
        for bound, index in zip(bounds[order].tolist(), candidates[order].tolist()):
            if bound <= best:
                break
            self.exact_scored += 1
            best = max(best, self._scorer.score(self._texts[index], text)["rougeL"].fmeasure)
            if best >= self.threshold:
                break
        return best

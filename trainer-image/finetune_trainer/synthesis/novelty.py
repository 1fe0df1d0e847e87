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

from collections import Counter, defaultdict
from typing import Optional


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
    """The pool (seeds, then kept candidates); `max_rouge` is the largest ROUGE-L F against it."""

    def __init__(self, threshold: float):
        from rouge_score import rouge_scorer

        self.threshold = threshold
        self._tokenizer = _CachedTokenizer()
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=self._tokenizer)
        self._texts: list[str] = []
        self._counts: list[Counter] = []
        self._lengths: list[int] = []
        self._postings: dict[str, list[int]] = defaultdict(list)
        self.exact_scored = 0  # pairs the bound could not decide (for the benchmark)

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, text: str) -> None:
        counts = Counter(self._tokenizer.tokenize(text))
        index = len(self._texts)
        self._texts.append(text)
        self._counts.append(counts)
        self._lengths.append(sum(counts.values()))
        for token in counts:
            self._postings[token].append(index)

    def max_rouge(self, text: str) -> float:
        """The largest ROUGE-L F of `text` against the pool: branch and bound over the pool texts by
        their upper bound, highest first; the search ends when no bound left can beat the best exact
        score, or once a score reaches the threshold (the candidate is out: the exact maximum no
        longer matters)."""
        tokens = self._tokenizer.tokenize(text)
        if not tokens:
            return 0.0
        counts = Counter(tokens)
        shared: dict[int, int] = defaultdict(int)
        for token, n in counts.items():
            for index in self._postings.get(token, ()):
                shared[index] += min(n, self._counts[index][token])
        total = len(tokens)
        best = 0.0
        for bound, index in sorted(((2 * m / (total + self._lengths[i]), i) for i, m in shared.items()),
                                   reverse=True):
            if bound <= best:
                break
            self.exact_scored += 1
            best = max(best, self._scorer.score(self._texts[index], text)["rougeL"].fmeasure)
            if best >= self.threshold:
                break
        return best

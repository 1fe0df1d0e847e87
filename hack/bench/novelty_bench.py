#!/usr/bin/env python
"""Benchmark: the SyntheticDataset novelty filter (synthesis/novelty.py) against rouge-score pair by pair.

Self-Instruct's rule scores every candidate instruction against every seed and every kept instruction
(ROUGE-L F < 0.7). Done naively that is n²/2 exact LCS computations in pure Python. The index bounds each
pair by the tokens two texts share (LCS <= multiset intersection) and computes the exact LCS only while a
bound can beat the best score so far. Printed per pool size: the time of the filter over n candidate
instructions (question-like, drawn from a small vocabulary so many share words: the hard case), the exact
LCS computations it needed, and the naive time (measured up to --naive-max, extrapolated as n² above);
the kept sets must be identical.

    python hack/bench/novelty_bench.py                 # n = 250, 1000, 4000
    python hack/bench/novelty_bench.py --sizes 10000
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "trainer-image"))
sys.path.insert(0, str(REPO / "operator"))

from finetune_trainer.synthesis.novelty import NoveltyIndex  # noqa: E402

OPENERS = ["How do I", "What is the", "Why does the", "Can I", "Which", "When should I", "Where does the"]
WORDS = ("job dataset adapter model operator cluster bucket secret rank alpha learning rate checkpoint governance "
         "bias probe evaluation split promotion alias serving vllm gpu node pod memory batch step epoch seed token "
         "template review candidate filter novelty duplicate quality license consent digest manifest report").split()


def instructions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(OPENERS)} {' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))}?"
            for _ in range(n)]


def with_index(texts: list[str], threshold: float) -> tuple[list[bool], float, int]:
    index = NoveltyIndex(threshold)
    started = time.perf_counter()
    kept = []
    for text in texts:
        ok = index.max_rouge(text) < threshold
        kept.append(ok)
        if ok:
            index.add(text)
    return kept, time.perf_counter() - started, index.exact_scored


def naive(texts: list[str], threshold: float) -> tuple[list[bool], float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    started = time.perf_counter()
    pool, kept = [], []
    for text in texts:
        ok = all(scorer.score(p, text)["rougeL"].fmeasure < threshold for p in pool)
        kept.append(ok)
        if ok:
            pool.append(text)
    return kept, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000])
    ap.add_argument("--naive-max", type=int, default=1000, help="largest n measured naively (above: extrapolated)")
    ap.add_argument("--threshold", type=float, default=0.7)
    ns = ap.parse_args()
    print(f"{'n':>7} {'kept':>6} {'index s':>9} {'exact LCS':>10} {'naive s':>10}")
    measured = None
    for n in ns.sizes:
        texts = instructions(n, seed=n)
        kept, seconds, exact = with_index(texts, ns.threshold)
        if n <= ns.naive_max:
            naive_kept, naive_seconds = naive(texts, ns.threshold)
            assert naive_kept == kept, "the index and rouge-score disagree"
            measured, shown = (n, naive_seconds), f"{naive_seconds:10.2f}"
        else:
            shown = f"~{measured[1] * (n / measured[0]) ** 2:9.0f}" if measured else "-"
        print(f"{n:>7} {sum(kept):>6} {seconds:9.2f} {exact:>10} {shown}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark: Dataset curation on planted datasets (tests/curation_planted.py) vs their truth.

For each seed, a dataset nobody wrote is generated -- distinct examples with hard negatives
(siblings sharing a template and half the answer), near-duplicates (whitespace/case variants,
re-ordered words, paraphrases), evaluation leaks (copied, varied or embedded in a longer
prompt) and low-quality lines -- and validated with every curation step on
(nearDuplicates, quality, decontamination; defaults). Printed per seed and in all:

  - near-duplicate recall: planted near-duplicates and eval leaks removed / planted;
  - false removals: distinct examples (and siblings) removed / distinct;
  - quality: planted placeholder, repetitive and boilerplate answers removed / planted;
  - validation time and peak RSS (this process) for the dataset's size;
  - the near-duplicate index's memory per example kept (tracemalloc, 20,000 examples of 30 words).

    python hack/bench/curation_bench.py                      # seeds 1..5, ~2,800 lines each
    python hack/bench/curation_bench.py --seeds 1 --distinct 50000 --clusters 5000   # scale
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "trainer-image"))
sys.path.insert(0, str(REPO / "operator"))

import curation_planted as planted  # noqa: E402

from finetune_operator.api.dataset import DatasetSpec  # noqa: E402
from finetune_trainer.validate import validate_text  # noqa: E402


def index_bytes_per_example(n: int = 20_000, threshold: float = 0.7) -> float:
    import random
    import tracemalloc

    from finetune_trainer.curation import NearDuplicateIndex

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(20_000)]
    texts = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(n)]
    index = NearDuplicateIndex(threshold)
    tracemalloc.start()
    for i, text in enumerate(texts):
        index.match_or_add(i, text)
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return used / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--distinct", type=int, default=2000)
    ap.add_argument("--clusters", type=int, default=300)
    ap.add_argument("--threshold", type=float, default=0.7)
    ns = ap.parse_args()
    spec = DatasetSpec.model_validate({
        "source": {"uri": "file:///planted.jsonl"}, "format": "chat", "evaluation": {"uri": "file:///eval.jsonl"},
        "provenance": {"origin": "hack/bench/curation_bench.py", "license": "CC0-1.0"},
        "curation": {"minExamples": 1, "nearDuplicates": {"threshold": ns.threshold}, "quality": {},
                     "decontamination": {}}})
    total = {"dups": 0, "caught": 0, "distinct": 0, "false": 0}
    print(f"{'seed':>5} {'lines':>7} {'near-dups':>9} {'recall':>7} {'distinct':>8} {'false':>6} {'rate':>7} "
          f"{'quality':>9} {'seconds':>8}")
    for seed in ns.seeds:
        source, evaluation, truth = planted.generate(seed, distinct=ns.distinct, clusters=ns.clusters)
        started = time.perf_counter()
        result = validate_text("\n".join(source) + "\n", spec, "\n".join(evaluation) + "\n")
        seconds = time.perf_counter() - started
        assert result.valid, result.message
        f = planted.measure(result.removed_jsonl, truth)
        quality = sum(r for _, r in f.quality.values()), sum(p for p, _ in f.quality.values())
        print(f"{seed:>5} {len(source):>7} {f.near_duplicates:>9} {f.recall:>7.2%} {f.distinct:>8} "
              f"{f.falsely_removed:>6} {f.false_removal_rate:>7.2%} {quality[0]:>4}/{quality[1]:<4} {seconds:>8.2f}")
        total["dups"] += f.near_duplicates
        total["caught"] += f.caught
        total["distinct"] += f.distinct
        total["false"] += f.falsely_removed
    print(f"all seeds: recall {total['caught'] / total['dups']:.2%} ({total['caught']} of {total['dups']}), "
          f"false removals {total['false'] / total['distinct']:.2%} ({total['false']} of {total['distinct']}); "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"near-duplicate index: {index_bytes_per_example(threshold=ns.threshold):.0f} bytes per example kept "
          f"(numPerm 128)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

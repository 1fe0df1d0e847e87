#!/usr/bin/env python
"""The memory plan (operator/finetune_operator/memory_plan.py) against measured peaks, on CPU.

For each case our trainer runs 2 optimizer steps (fp32, LoRA r=16 on all linears, packing, prefix
cache off: the plan is about what a GPU holds, and the cache lives in host memory) in a child
process; measured = peak RSS - RSS after the imports (so the Python/torch runtime is not counted).
The estimate is memory_plan.estimate(..., device="cpu") with the data's real share of target
tokens. On CPU there is no CUDA context; everything else the plan counts exists.

    python hack/bench/memory_plan_bench.py            # the cases of docs/benchmarks.md (~3 min)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "tests"))

CHILD = """
import json, os, resource, sys
import torch, transformers, peft  # imported before the baseline
from finetune_trainer import train
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert train.run(sys.argv[1]) == 0
print("RESULT", json.dumps({"baseline": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

#: (shape, rows per micro-batch, row length, gradient checkpointing)
CASES = [("tiny", 8, 512, False), ("small", 4, 256, False), ("small", 16, 256, False), ("small", 8, 512, False),
         ("small", 8, 512, True), ("small", 2, 1024, False)]


def main() -> None:
    import trainer_bench as tb
    from trainer.helpers import trainer_config, write_config

    from finetune_operator import memory_plan
    from finetune_trainer import data, model_io

    work = Path(tempfile.mkdtemp(prefix="memory-plan-bench-"))
    print(f"{'case':<26}{'measured MiB':>13}{'estimate MiB':>13}{'ratio':>7}  parts (MiB)")
    for shape, rows, seq, gc in CASES:
        model = work / f"model-{shape}"
        if not (model / "config.json").exists():
            tb.build_model(model, shape, "cpu")
        data_dir = work / f"data-{shape}-{seq}"
        if not (data_dir / "train.jsonl").exists():
            tb.write_data(data_dir, model, 64, 8, seq // 2, seq)
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        training = {"maxSteps": 2, "batchSize": rows, "maxSeqLength": seq, "gradientCheckpointing": gc,
                    "packing": True, "precision": "fp32", "evalEverySteps": 1000, "checkpointEverySteps": 1000}
        lora = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}
        cfg = trainer_config(model_uri=f"file://{model}", data_uri=f"file://{data_dir}", output_uri=f"file://{out}",
                             training=training, lora=lora)
        path = write_config(cfg, work / "config.json")
        # Large blocks straight from mmap and back on free: RSS then follows live tensors, not what
        # glibc's heap keeps cached after a free (which would make the peak a property of malloc).
        env = {**os.environ, "FINETUNE_PREFIX_CACHE": "0", "FINETUNE_CACHE_DIR": str(work / "cache"),
               "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(proc.stderr[-3000:])
        r = json.loads(line[len("RESULT "):])
        measured = r["peak"] - r["baseline"]
        tok = model_io.load_tokenizer(model)
        examples = data.tokenize_all(data.read_examples(f"file://{data_dir}", "train.jsonl", "chat"), tok, seq)
        share = sum(e.trainable_tokens for e in examples) / sum(len(e) for e in examples)
        spec = {"method": "lora", "lora": lora, "training": training, "resources": {"gpusPerNode": 0}}
        plan = memory_plan.estimate(json.loads((model / "config.json").read_text()), spec, device="cpu",
                                    target_fraction=share)
        parts = " ".join(f"{k} {v / 2**20:.0f}" for k, v in plan.parts.items())
        name = f"{shape} {rows}x{seq}{' gc' if gc else ''}"
        print(f"{name:<26}{measured / 2**20:>13.0f}{plan.total / 2**20:>13.0f}{plan.total / measured:>7.2f}  {parts}",
              flush=True)


if __name__ == "__main__":
    main()

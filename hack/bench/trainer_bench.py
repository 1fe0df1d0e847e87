#!/usr/bin/env python
"""Benchmark: our trainer vs a plain HF `Trainer` + peft baseline, side by side.

Same Llama-shaped model (built from a config: random weights, nothing downloaded), same
synthetic data (chat examples of 16..512 tokens over the offline tiny tokenizer), same
hyperparameters and optimizer-step count. The baseline pads every batch to its longest
sequence (DataCollatorForSeq2Seq, the usual recipe); ours packs examples into rows.

Each side runs in its own subprocess (so peak memory is its own) and reports:
  - real tokens/s: non-padding tokens trained on per second of training loop
  - peak memory: torch.cuda.max_memory_allocated on GPU, peak process RSS on CPU
  - eval loss: mean loss per response token on the same eval set, computed by the same function
  - MFU (GPU): useful FLOPs / (time * peak), with useful FLOPs per example of n real tokens
        6 * N * n  +  12 * L * d * n^2
    N = parameters of the base model except the input embedding (its lookup is not a matmul),
    L = layers, d = hidden size. 6N is the standard forward+backward cost of the frozen base
    (it overstates LoRA's backward slightly: frozen weights get no weight gradient), the second
    term is causal-masked attention score and value matmuls counted as full (the PaLM convention).
    Padding and recomputation (gradient checkpointing) are not useful FLOPs.

    python hack/bench/trainer_bench.py --steps 20                # CPU, ~22M-param model
    python hack/bench/trainer_bench.py --device cuda --shape llama3-8b --precision bf16 --method qlora
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # ~22M parameters: big enough that matmuls dominate, small enough for one CPU thread.
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=1024, vocab_size=16384),
    # For quick checks of the script itself.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
    # Llama-3-8B's shape (random weights).
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
}
WORDS = ("the quick brown fox jumps over lazy dog model learns from examples capital france paris answer "
         "question translate summarize kubernetes operator dataset adapter governance promotion").split()


# ---------------------------------------------------------------- setup (parent process)


def build_model(out: Path, shape: str, device: str) -> Path:
    """Save a random Llama-shaped model + the offline tiny tokenizer in HF format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from finetune_trainer.tiny import train_tokenizer

    train_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # initialise 8B weights on the GPU: minutes faster than on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the sides run in child processes and need the memory
    return out


def write_data(folder: Path, model_dir: Path, n_train: int, n_eval: int, min_len: int, max_len: int,
               seed: int = 0) -> None:
    """Chat examples whose rendered length is roughly uniform in [min_len, max_len] tokens.
    The answer reverses the prompt's words, so there is something to learn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokens_per_word = len(tok(" ".join(WORDS * 4))["input_ids"]) / (len(WORDS) * 4)
    rng = random.Random(seed)

    def example() -> str:
        target = rng.randint(min_len, max_len)
        n_words = max(2, int((target - 24) / (2 * tokens_per_word)))  # prompt + answer + template
        words = [rng.choice(WORDS) for _ in range(n_words)]
        return json.dumps({"messages": [{"role": "user", "content": "Reverse: " + " ".join(words)},
                                        {"role": "assistant", "content": " ".join(reversed(words))}]})

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("\n".join(example() for _ in range(n_train)) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(example() for _ in range(n_eval)) + "\n")


def mean_example_length(model_dir: Path, data_dir: Path, max_len: int) -> float:
    from finetune_trainer import data, model_io

    tok = model_io.load_tokenizer(model_dir)
    examples = data.tokenize_all(data.read_examples(f"file://{data_dir}", "train.jsonl", "chat"), tok, max_len)
    return sum(len(e) for e in examples) / len(examples)


def trainer_config(args, model_dir: Path, data_dir: Path, out: Path, rows_per_batch: int, row_len: int):
    from finetune_operator.api.trainer_config import TrainerConfig

    return TrainerConfig.model_validate({
        "job": {"name": "bench"},
        "baseModel": {"uri": f"file://{model_dir}"},
        "data": {"uri": f"file://{data_dir}", "format": "chat"},
        "method": args.method,
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.05, "targetModules": ["all-linear"]},
        **({"quantization": {"quantType": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}}
           if args.method == "qlora" else {}),
        "training": {"maxSteps": args.steps, "batchSize": rows_per_batch, "maxSeqLength": row_len,
                     "learningRate": args.lr, "lrScheduler": "cosine", "warmupRatio": 0.1, "precision": args.precision,
                     "gradientCheckpointing": args.gradient_checkpointing, "packing": True, "seed": 0,
                     "evalEverySteps": 10**6, "checkpointEverySteps": 10**6},
        "outputURI": f"file://{out}",
        "distributed": {"strategy": args.strategy},
        "metricsPort": 0,
        "progressIntervalSeconds": 30,
    })


# ---------------------------------------------------------------- one side (child process)


def peak_memory_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ours(spec: dict) -> dict:
    """Our trainer exactly as the Job runs it (train.run on a rendered config)."""
    from finetune_trainer import train

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("finetune_trainer").addHandler(handler)
    assert train.run(spec["config_path"]) == 0
    done = next(r for r in records if getattr(r, "event", None) == "done")
    return {"train_seconds": done.train_seconds, "real_tokens": done.tokens_this_run,
            "eval_loss": done.metrics["evalLoss"], "example_lengths_sq": done.sum_sq_lengths,
            "peak_memory": peak_memory_bytes(spec["device"])}


def run_ours_ranks(spec: dict, ranks: int, env: dict) -> dict:
    """Our trainer on `ranks` ranks, as a multi-GPU pod runs it: `finetune-trainer train` with the
    PET_* settings the operator renders (torchrun inside). Rank 0's "done" line has the world's
    real tokens and its own peak GPU memory."""
    env = dict(env, PET_NNODES="1", PET_NPROC_PER_NODE=str(ranks))
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "train", "--config", spec["config_path"]],
                          env=env, capture_output=True, text=True)
    done = None
    for line in proc.stderr.splitlines():
        if line.startswith("{") and '"event": "done"' in line:
            done = json.loads(line)
    if proc.returncode != 0 or done is None:
        sys.exit(f"ours on {ranks} ranks failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {"train_seconds": done["train_seconds"], "real_tokens": done["tokens_this_run"],
            "eval_loss": done["metrics"]["evalLoss"], "example_lengths_sq": done["sum_sq_lengths"],
            "peak_memory": int(done.get("peak_memory_bytes") or 0)}


def run_hf(spec: dict) -> dict:
    """The baseline: HF Trainer + peft, padding each batch to its longest example."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from finetune_trainer import data, model_io, objective
    from finetune_trainer.train import load_config, quantization_of

    cfg = load_config(spec["config_path"])
    t = cfg.training
    device = torch.device(spec["device"])
    model_dir = Path(cfg.baseModel.uri.removeprefix("file://"))
    tok = model_io.load_tokenizer(model_dir)
    train_set = data.tokenize_all(data.read_examples(cfg.data.uri, "train.jsonl", "chat"), tok, t.maxSeqLength)
    eval_set = data.tokenize_all(data.read_examples(cfg.data.uri, "eval.jsonl", "chat"), tok, t.maxSeqLength)
    # HF shifts labels inside the model: give it unshifted labels with the same response-only mask.
    features = [{"input_ids": e.input_ids, "labels": [data.IGNORE] + e.labels[:-1]} for e in train_set]

    torch.manual_seed(t.seed)
    base = model_io.load_base_model(model_dir, precision=spec["precision"], device=device,
                                    quantization=quantization_of(cfg), gradient_checkpointing=t.gradientCheckpointing)
    model = model_io.build_peft_model(base, cfg.method, cfg.lora, cfg.baseModel.uri)

    collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=data.IGNORE)
    counted = {"real_tokens": 0, "sum_sq": 0}

    def count_real_tokens(module, args, kwargs):
        # Counted where the model runs (the dataloader fetches a batch ahead, so the collator overcounts).
        if module.training and kwargs.get("attention_mask") is not None:
            lengths = kwargs["attention_mask"].sum(dim=1)
            counted["real_tokens"] += int(lengths.sum())
            counted["sum_sq"] += int((lengths ** 2).sum())

    objective.causal_lm(model).register_forward_pre_hook(count_real_tokens, with_kwargs=True)

    timing = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            timing["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            timing["end"] = time.perf_counter()

    args = TrainingArguments(
        output_dir=spec["work_dir"], max_steps=t.maxSteps, per_device_train_batch_size=spec["hf_batch_size"],
        learning_rate=t.learningRate, lr_scheduler_type=t.lrScheduler, warmup_steps=int(t.warmupRatio * t.maxSteps),
        weight_decay=t.weightDecay, max_grad_norm=t.maxGradNorm, bf16=spec["precision"] == "bf16",
        gradient_checkpointing=False,  # already set up on the model, like ours
        save_strategy="no", eval_strategy="no", report_to=[], logging_steps=10**6, seed=t.seed,
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=device.type == "cpu",
    )
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    amp = torch.bfloat16 if spec["precision"] == "bf16" else None
    eval_loss = objective.evaluate(model, eval_set, batch_size=t.batchSize, max_len=t.maxSeqLength, packing=True,
                                   pad_id=tok.pad_token_id, device=device, amp_dtype=amp)
    return {"train_seconds": timing["end"] - timing["start"], "real_tokens": counted["real_tokens"],
            "eval_loss": eval_loss, "example_lengths_sq": counted["sum_sq"],
            "peak_memory": peak_memory_bytes(spec["device"])}


# ---------------------------------------------------------------- report


def useful_flops(shape: dict, real_tokens: int, sum_sq_lengths: int) -> float:
    d, layers = shape["hidden_size"], shape["num_hidden_layers"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * shape["intermediate_size"]
    n = layers * per_layer + d * shape["vocab_size"]  # + output head; input embedding excluded
    return 6 * n * real_tokens + 12 * layers * d * sum_sq_lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--method", default="lora", choices=["lora", "qlora", "dora"])
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on GPU")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps for each side")
    ap.add_argument("--batch-size", type=int, default=8, help="baseline examples per step")
    ap.add_argument("--max-len", type=int, default=512, help="longest example; our packed row length")
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--model-dir", type=Path, help="reuse a model built by an earlier run")
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--sides", default="ours,hf")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--ranks", type=int, default=1,
                    help="our side on this many ranks (torchrun in one pod; one GPU each): the same global batch")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "auto"], help="with --ranks > 1")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")

    if args.child:  # one side, in its own process
        spec = json.loads(args.child)
        result = (run_ours if spec["side"] == "ours" else run_hf)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    model_dir = args.model_dir or work / "model"
    if not (model_dir / "config.json").exists():
        t0 = time.time()
        build_model(model_dir, args.shape, args.device)
        print(f"built {args.shape} model in {time.time() - t0:.0f}s at {model_dir}", file=sys.stderr)
    data_dir = work / "data"
    write_data(data_dir, model_dir, args.examples, max(32, args.examples // 8), args.min_len, args.max_len)
    # Same tokens per optimizer step on both sides: packed rows hold ~batch * mean length tokens.
    # Rows pack ~93% full; the row length is stretched a little so that rows * length matches the
    # baseline's batch * mean length (examples themselves never exceed --max-len, see write_data).
    mean_len = mean_example_length(model_dir, data_dir, args.max_len)
    tokens_per_step = args.batch_size * mean_len
    rows = max(1, round(tokens_per_step / (0.93 * args.max_len)))
    row_len = max(args.max_len, math.ceil(tokens_per_step / (0.93 * rows) / 8) * 8)
    results = {}
    for side in args.sides.split(","):
        shutil.rmtree(work / f"out-{side}", ignore_errors=True)  # never resume an earlier run's checkpoints
        cfg = trainer_config(args, model_dir, data_dir, work / f"out-{side}", rows, row_len)
        config_path = work / f"{side}.json"
        config_path.write_text(cfg.model_dump_json(exclude_none=True))
        spec = {"side": side, "config_path": str(config_path), "device": args.device, "precision": args.precision,
                "hf_batch_size": args.batch_size, "work_dir": str(work / f"hf-{side}")}
        env = dict(os.environ, FINETUNE_CACHE_DIR=str(work / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if side == "ours" and args.ranks > 1:
            results[side] = run_ours_ranks(spec, args.ranks, env)
            print(f"{side}: done on {args.ranks} ranks ({args.strategy})", file=sys.stderr)
            continue
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        results[side] = json.loads(line[len("RESULT "):])
        print(f"{side}: done", file=sys.stderr)

    shape = SHAPES[args.shape]
    print(f"\nmodel={args.shape} device={args.device} method={args.method} precision={args.precision} "
          f"steps={args.steps} examples={args.examples} (mean {mean_len:.0f} tokens)\n"
          f"baseline batch={args.batch_size} examples padded to the longest; ours batch={rows} packed rows "
          f"of up to {row_len} tokens" + (f"; ours on {args.ranks} ranks ({args.strategy}; peak memory is rank "
                                          "0's, MFU over all ranks' GPUs)" if args.ranks > 1 else ""))
    header = f"{'trainer':<10}{'real tok/s':>12}{'train s':>10}{'real tokens':>13}{'peak mem MiB':>14}{'eval loss':>11}"
    if args.device == "cuda":
        header += f"{'MFU %':>8}"
    print(header)
    for side, r in results.items():
        tps = r["real_tokens"] / r["train_seconds"]
        row = (f"{side:<10}{tps:>12.1f}{r['train_seconds']:>10.1f}{r['real_tokens']:>13}"
               f"{r['peak_memory'] / 2**20:>14.0f}{r['eval_loss']:>11.4f}")
        if args.device == "cuda":
            flops = useful_flops(shape, r["real_tokens"], r["example_lengths_sq"])
            gpus = args.ranks if side == "ours" else 1
            r["mfu"] = flops / r["train_seconds"] / (args.peak_tflops * 1e12 * gpus)
            row += f"{100 * r['mfu']:>8.1f}"
        r["tokens_per_second"] = tps
        print(row)
    if {"ours", "hf"} <= results.keys():
        ratio = results["ours"]["tokens_per_second"] / results["hf"]["tokens_per_second"]
        print(f"speed-up (real tokens/s, ours / hf): {ratio:.2f}x; eval loss ours {results['ours']['eval_loss']:.4f} "
              f"vs hf {results['hf']['eval_loss']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()

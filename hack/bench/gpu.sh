#!/usr/bin/env bash
# Trainer benchmark on one H100/H200: our trainer vs HF Trainer + peft (padding), bf16 LoRA and QLoRA,
# on a Llama-3-8B-shaped model built from its config (random bf16 weights, nothing downloaded).
# Prints real tokens/s, peak GPU memory, eval loss and MFU for each (FLOP formula: see the docstring
# of hack/bench/trainer_bench.py: 6*N per real token + 12*L*d*n^2 per example of n tokens, over
# 989 TFLOP/s dense bf16 peak).
#
# On a machine with more than one GPU it then runs our trainer on all of them (DDP and FSDP2, the
# same global batch; +up to 10 minutes).
#
# Needs: CUDA torch 2.13 + the `trainer` extra (e.g. inside the trainer image, or
# `pip install -e '.[trainer]'`), ~20 GB free disk for the model. Budget: < 8 minutes wall.
#   hack/bench/gpu.sh                 # STEPS=12 by default
#   STEPS=20 OUT=/tmp/bench hack/bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

STEPS=${STEPS:-12}
OUT=${OUT:-${TMPDIR:-/tmp}/trainer-bench-gpu}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/trainer-image:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("torch", torch.__version__, torch.cuda.get_device_name())'

common=(--device cuda --shape llama3-8b --precision bf16 --steps "$STEPS" --batch-size 8 --max-len 2048
        --examples 400 --lr 2e-4 --lora-r 16 --gradient-checkpointing --model-dir "$OUT/model")
start=$SECONDS
for method in lora qlora; do
  echo "== $method (elapsed ${SECONDS}s)"
  # The first run builds the model (initialised on the GPU, saved once); the second reuses it.
  left=$((470 - (SECONDS - start)))  # keep the whole script under 8 minutes
  timeout "$left" "$PYTHON" hack/bench/trainer_bench.py "${common[@]}" --method "$method" \
      --work-dir "$OUT/$method" --json "$OUT/$method.json"
done
# All the machine's GPUs (one pod of N ranks, torchrun inside): our trainer only, bf16 LoRA, DDP and
# FSDP2, with N times the single-GPU batch (so every GPU gets as many rows per step as the single
# run had). Peak memory is rank 0's; MFU is over all N GPUs' peak.
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -gt 1 ]; then
  for strategy in ddp fsdp; do
    echo "== lora on $NGPU GPUs, $strategy (elapsed ${SECONDS}s)"
    timeout 300 "$PYTHON" hack/bench/trainer_bench.py "${common[@]}" --method lora --sides ours \
        --batch-size $((8 * NGPU)) --examples $((400 * NGPU)) --ranks "$NGPU" --strategy "$strategy" --work-dir "$OUT/lora-$strategy" --json "$OUT/lora-$strategy.json"
  done
fi
echo "total wall time: $((SECONDS - start))s; results in $OUT/*.json"

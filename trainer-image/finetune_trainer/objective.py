"""The training objective: summed cross-entropy over response tokens, and eval loss.

Logits are computed only at positions that have a target (response tokens): prompt and
padding positions never go through the output head, which for a large vocabulary is a
big share of the work and of the activation memory.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE, TokenizedExample, block_causal_mask, collate, epoch_batches


def causal_lm(model):
    """The *ForCausalLM module (inside a PeftModel, with the adapter layers injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def target_logits(model, batch: dict, device: torch.device,
                  amp_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the batch's target positions only, and those targets (row-major order)."""
    lm = causal_lm(model)
    labels = batch["labels"].to(device)
    keep = labels != IGNORE
    with autocast(device, amp_dtype):
        hidden = lm.get_decoder()(
            input_ids=batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            attention_mask=block_causal_mask(batch["segment_ids"].to(device)),
            use_cache=False,
        ).last_hidden_state
        logits = lm.get_output_embeddings()(hidden[keep])
    return logits, labels[keep]


def loss_sum(model, batch: dict, device: torch.device, amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's targets (divide by batch['n_targets'] for the mean)."""
    logits, targets = target_logits(model, batch, device, amp_dtype)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


@torch.no_grad()
def evaluate(model, examples: Sequence[TokenizedExample], *, batch_size: int, max_len: int, packing: bool,
             pad_id: int, device: torch.device, amp_dtype: Optional[torch.dtype] = None) -> float:
    """Mean loss per response token over `examples` (deterministic order, dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    lengths = [len(e) for e in examples]
    for batch_rows in epoch_batches(lengths, epoch=0, seed=0, batch_size=batch_size, max_len=max_len,
                                    packing=packing, shuffle=False):
        batch = collate(batch_rows, examples, pad_id)
        if batch["n_targets"]:
            total += float(loss_sum(model, batch, device, amp_dtype))
            count += batch["n_targets"]
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def example_logprobs(model, examples: Sequence[TokenizedExample], *, max_len: int, pad_id: int,
                     device: torch.device, batch_size: int = 8,
                     amp_dtype: Optional[torch.dtype] = None) -> list[float]:
    """Mean per-token log-probability of each example's response tokens.

    Examples are packed exactly like training rows (block-diagonal attention, positions
    restarting per example), so each score equals scoring the example alone, at a fraction
    of the forward passes; NaN for an example with no response token left.
    """
    sums, counts = [0.0] * len(examples), [0] * len(examples)
    lengths = [len(e) for e in examples]
    for batch_rows in epoch_batches(lengths, epoch=0, seed=0, batch_size=batch_size, max_len=max_len,
                                    packing=True, shuffle=False):
        batch = collate(batch_rows, examples, pad_id)
        logits, targets = target_logits(model, batch, device, amp_dtype)
        token_lp = -F.cross_entropy(logits.float(), targets, reduction="none").cpu()
        labels = batch["labels"]
        keep = labels != IGNORE
        rows = torch.arange(labels.shape[0])[:, None].expand_as(labels)[keep]
        segments = batch["segment_ids"][keep]
        for row, segment, value in zip(rows.tolist(), segments.tolist(), token_lp.tolist()):
            idx = batch_rows[row][segment - 1]
            sums[idx] += value
            counts[idx] += 1
    return [s / c if c else float("nan") for s, c in zip(sums, counts)]

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
    prefix = shared_prefix(model, examples, max_len=max_len, pad_id=pad_id, device=device, amp_dtype=amp_dtype)
    for batch_rows in epoch_batches(lengths, epoch=0, seed=0, batch_size=batch_size, max_len=max_len,
                                    packing=packing, shuffle=False):
        batch = collate(batch_rows, examples, pad_id)
        if batch["n_targets"]:
            if prefix is not None:
                total += float(cached_loss_sum(model, prefix, batch, device, amp_dtype))
            else:
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
    prefix = shared_prefix(model, examples, max_len=max_len, pad_id=pad_id, device=device, amp_dtype=amp_dtype)
    for batch_rows in epoch_batches(lengths, epoch=0, seed=0, batch_size=batch_size, max_len=max_len,
                                    packing=True, shuffle=False):
        batch = collate(batch_rows, examples, pad_id)
        if prefix is not None:
            logits, targets = cached_target_logits(model, prefix, batch, device, amp_dtype)
        else:
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


# ---------------------------------------------------------------- frozen-prefix activations
#
# When LoRA adapts only the upper decoder layers (e.g. targetModules naming layers.20 and up),
# the embeddings and the layers below hold nothing to train: what they output for an example is
# a fixed function of its tokens (block-diagonal attention and positions restarting per example
# make a packed row compute each example on its own). So they run once per example, before the
# first step, and every epoch runs only the trainable layers on those stored hidden states.
# Same loss, same gradients (tests/trainer/test_prefix_cache.py); on the quickstart's 30-layer
# model with the top 10 layers adapted, an epoch costs 10 layers forward and backward instead of
# 30 forward and 10 backward.

#: Stored activations are capped (bytes): beyond this the run takes the ordinary path.
PREFIX_CACHE_MAX_BYTES = 1 << 30


def _decoder_parts(model):
    """(decoder, its layers) for decoders shaped like Llama / Qwen2 / Mistral, else None."""
    decoder = causal_lm(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    needed = ("embed_tokens", "rotary_emb", "norm")
    if layers is None or not all(hasattr(decoder, n) for n in needed) or not isinstance(layers, torch.nn.ModuleList):
        return None
    return decoder, layers


def frozen_prefix_layers(model) -> int:
    """How many leading decoder layers (with the embeddings) have no trainable parameter and no
    randomness; 0 when the model's shape is not one this module can split."""
    parts = _decoder_parts(model)
    if parts is None:
        return 0
    decoder, layers = parts
    if any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return 0
    if float(getattr(decoder.config, "attention_dropout", 0.0) or 0.0) > 0:
        return 0  # dropout in the frozen layers would make their output random: not cacheable
    count = 0
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        count += 1
    return count if count < len(layers) else 0


def _causal_mask(decoder, hidden: torch.Tensor, segment_ids: torch.Tensor, position_ids: torch.Tensor):
    """The mask the decoder itself would pass its layers for our block-causal mask."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=decoder.config, inputs_embeds=hidden,
                              attention_mask=block_causal_mask(segment_ids), cache=None, position_ids=position_ids)


def _run_layers(decoder, layers, hidden, position_ids, segment_ids):
    mask = _causal_mask(decoder, hidden, segment_ids, position_ids)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                       position_embeddings=position_embeddings, use_cache=False)
        if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
            hidden = hidden[0]
    return hidden


class PrefixCache:
    """Hidden states after the frozen prefix, one [tokens, hidden] tensor per example."""

    def __init__(self, layers: int, states: list[torch.Tensor]):
        self.layers, self.states = layers, states

    @classmethod
    @torch.no_grad()
    def build(cls, model, examples: Sequence[TokenizedExample], *, max_len: int, pad_id: int,
              device: torch.device, amp_dtype: Optional[torch.dtype] = None,
              max_bytes: int = PREFIX_CACHE_MAX_BYTES, layers: Optional[int] = None) -> Optional["PrefixCache"]:
        """None when nothing can be cached (no frozen prefix, an unknown model shape, too big).
        `layers`: how many to run (default: frozen_prefix_layers, the training rule)."""
        k = frozen_prefix_layers(model) if layers is None else layers
        if k == 0 or not examples:
            return None
        decoder, layers = _decoder_parts(model)
        size = sum(len(e) for e in examples) * decoder.config.hidden_size * 4
        if size > max_bytes:
            return None
        states: list[Optional[torch.Tensor]] = [None] * len(examples)
        lengths = [len(e) for e in examples]
        for rows in epoch_batches(lengths, epoch=0, seed=0, batch_size=8, max_len=max_len, packing=True,
                                  shuffle=False):
            batch = collate(rows, examples, pad_id)
            ids, pos, seg = (batch[k_].to(device) for k_ in ("input_ids", "position_ids", "segment_ids"))
            with autocast(device, amp_dtype):
                hidden = _run_layers(decoder, layers[:k], decoder.embed_tokens(ids), pos, seg)
            hidden = hidden.float().cpu()
            for r, row in enumerate(rows):
                start = 0
                for idx in row:
                    states[idx] = hidden[r, start:start + lengths[idx]].clone()
                    start += lengths[idx]
        return cls(k, states)

    def hidden(self, batch_rows: list[list[int]], width: int) -> torch.Tensor:
        """The stored states of a collated micro-batch, laid out like its input_ids (zeros at padding)."""
        dim = self.states[batch_rows[0][0]].shape[-1]
        out = torch.zeros(len(batch_rows), width, dim)
        for r, row in enumerate(batch_rows):
            start = 0
            for idx in row:
                n = self.states[idx].shape[0]
                out[r, start:start + n] = self.states[idx]
                start += n
        return out


def cached_target_logits(model, cache: PrefixCache, batch: dict, device: torch.device,
                         amp_dtype: Optional[torch.dtype] = None):
    """target_logits computed from the stored prefix states: only the trainable layers run."""
    decoder, layers = _decoder_parts(model)
    lm = causal_lm(model)
    labels = batch["labels"].to(device)
    keep = labels != IGNORE
    hidden = cache.hidden(batch["rows"], labels.shape[1]).to(device)
    with autocast(device, amp_dtype):
        hidden = _run_layers(decoder, layers[cache.layers:], hidden, batch["position_ids"].to(device),
                             batch["segment_ids"].to(device))
        hidden = decoder.norm(hidden)
        logits = lm.get_output_embeddings()(hidden[keep])
    return logits, labels[keep]


def cached_loss_sum(model, cache: PrefixCache, batch: dict, device: torch.device,
                    amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """loss_sum from the stored prefix states (`batch` from data.collate over the cached examples)."""
    logits, targets = cached_target_logits(model, cache, batch, device, amp_dtype)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


# ---------------------------------------------------------------- the same prefix, adapter on and off
#
# Governance scores the same examples twice: with the adapter and with it disabled (the base
# model). Layers below the lowest adapter module compute the same either way, so the second pass
# reuses the first one's states (bias probes, eval loss): exact, and about a third less work for
# the quickstart's adapter on the top 8 of 30 layers.


def adapter_free_prefix(model) -> int:
    """Leading decoder layers (with the embeddings) that hold no adapter module; 0 without an adapter."""
    parts = _decoder_parts(model)
    if parts is None:
        return 0
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return 0
    decoder, layers = parts

    def adapted(module) -> bool:
        return any(isinstance(m, BaseTunerLayer) for m in module.modules())

    if not adapted(causal_lm(model)) or adapted(decoder.embed_tokens):
        return 0
    count = 0
    for layer in layers:
        if adapted(layer):
            break
        count += 1
    return count if count < len(layers) else 0


_shared: dict = {}  # the last inference prefix: {"model": weakref, "key": ..., "cache": PrefixCache}


def shared_prefix(model, examples: Sequence[TokenizedExample], *, max_len: int, pad_id: int, device: torch.device,
                  amp_dtype: Optional[torch.dtype] = None) -> Optional[PrefixCache]:
    """The adapter-free prefix states of `examples`, reused by the next call on the same model and
    examples (the last set only: governance scores one set with the adapter on, then off)."""
    import weakref

    if torch.is_grad_enabled() or causal_lm(model).training:
        return None  # inference only: training has its own cache, and dropout would differ
    k = adapter_free_prefix(model)
    if k == 0:
        return None
    decoder = causal_lm(model).get_decoder()
    key = (k, max_len, pad_id, str(device), amp_dtype, tuple(tuple(e.input_ids) for e in examples))
    ref = _shared.get("model")
    if ref is not None and ref() is decoder and _shared.get("key") == key:
        return _shared["cache"]
    cache = PrefixCache.build(model, examples, max_len=max_len, pad_id=pad_id, device=device, amp_dtype=amp_dtype,
                              layers=k)
    _shared.clear()
    if cache is not None:
        _shared.update(model=weakref.ref(decoder), key=key, cache=cache)
    return cache

"""Packing must not change what the model computes: a packed row's loss equals the examples' losses
one by one; and only response tokens are targets."""

from __future__ import annotations

import random

import pytest
import torch

from finetune_trainer import data, formats, model_io, objective

from .helpers import synthetic_record


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    tok = model_io.load_tokenizer(tiny_model_dir)
    data.ensure_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def adapted_model(tiny_model_dir):
    """The tiny model with a LoRA whose B matrices are non-zero, so the adapter path is exercised too."""
    from finetune_operator.api.finetunejob import LoraSettings

    torch.manual_seed(0)
    base = model_io.load_base_model(tiny_model_dir, precision="fp32", device=torch.device("cpu"))
    model = model_io.build_peft_model(base, "lora", LoraSettings(r=4, alpha=8, dropout=0.0), "file:///tiny")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def examples(tokenizer, n: int, fmt: str = "chat", seed: int = 1):
    rng = random.Random(seed)
    parsed = [formats.PARSERS[fmt](synthetic_record(rng, fmt, 2, 20)) for _ in range(n)]
    return data.tokenize_all(parsed, tokenizer, 128)


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_packed_loss_equals_one_by_one(adapted_model, tokenizer, fmt):
    exs = examples(tokenizer, 10, fmt)
    cpu = torch.device("cpu")
    rows = data.pack_rows(range(len(exs)), [len(e) for e in exs], 256)
    assert any(len(r) >= 3 for r in rows), "the test needs rows with several examples"
    packed = data.collate(rows, exs, tokenizer.pad_token_id)
    with torch.no_grad():
        packed_mean = float(objective.loss_sum(adapted_model, packed, cpu)) / packed["n_targets"]
        singles = [data.collate([[i]], exs, tokenizer.pad_token_id) for i in range(len(exs))]
        total = sum(float(objective.loss_sum(adapted_model, b, cpu)) for b in singles)
    assert packed["n_targets"] == sum(b["n_targets"] for b in singles)
    assert packed_mean == pytest.approx(total / packed["n_targets"], rel=1e-5)


def test_a_leaky_mask_would_be_caught(adapted_model, tokenizer):
    """Control: with plain causal attention over the packed row (leaking), the losses differ."""
    exs = examples(tokenizer, 10)
    cpu = torch.device("cpu")
    rows = data.pack_rows(range(len(exs)), [len(e) for e in exs], 256)
    packed = data.collate(rows, exs, tokenizer.pad_token_id)
    # One segment per row and running positions: plain causal attention across the packed examples.
    leaky = dict(packed, segment_ids=torch.ones_like(packed["segment_ids"]),
                 position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    with torch.no_grad():
        good = float(objective.loss_sum(adapted_model, packed, cpu))
        bad = float(objective.loss_sum(adapted_model, leaky, cpu))
    # The leak is visible at the tolerance the equality test above uses, so that test has teeth.
    assert bad != pytest.approx(good, rel=1e-5)


def test_block_causal_mask():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = data.block_causal_mask(segments)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [0, 0, 1, 0, 0, 0],
                    [0, 0, 1, 1, 0, 0],
                    [0, 0, 1, 1, 1, 0],
                    [0, 0, 0, 0, 0, 1]]


def test_only_response_tokens_are_targets(tokenizer):
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "capital of france"},
                           {"role": "assistant", "content": "paris"},
                           {"role": "user", "content": "and the dog"},
                           {"role": "assistant", "content": "lazy dog"}]}
    ex = data.tokenize_example(formats.parse_chat(record), tokenizer, 512)
    targets = tokenizer.decode([t for t in ex.labels if t != data.IGNORE])
    assert targets.replace(" ", "") == "paris<|im_end|>lazydog<|im_end|>"
    # shifted: each target is the next input token
    for i, label in enumerate(ex.labels):
        if label != data.IGNORE:
            assert label == ex.input_ids[i + 1]


def test_an_answer_that_repeats_the_prompt_is_still_the_target(tokenizer):
    record = {"messages": [{"role": "user", "content": "say dog"}, {"role": "assistant", "content": "dog"}]}
    ex = data.tokenize_example(formats.parse_chat(record), tokenizer, 512)
    targets = [i for i, t in enumerate(ex.labels) if t != data.IGNORE]
    assert tokenizer.decode([ex.labels[i] for i in targets]).replace(" ", "") == "dog<|im_end|>"
    # the targets are the last tokens of the example (the answer), not the "dog" in the prompt
    assert targets[-1] >= len(ex) - 4


def test_packing_wastes_little_and_keeps_every_example(tokenizer):
    exs = examples(tokenizer, 60)
    lengths = [len(e) for e in exs]
    batches = data.epoch_batches(lengths, epoch=0, seed=3, batch_size=4, max_len=128, packing=True)
    seen = sorted(i for b in batches for row in b for i in row)
    assert seen == list(range(len(exs)))
    rows = [row for b in batches for row in b]
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    fill = sum(lengths) / (len(rows) * 128)
    assert fill > 0.85, fill
    again = data.epoch_batches(lengths, epoch=0, seed=3, batch_size=4, max_len=128, packing=True)
    other = data.epoch_batches(lengths, epoch=1, seed=3, batch_size=4, max_len=128, packing=True)
    assert again == batches and other != batches


def test_unpacked_batches_are_length_grouped(tokenizer):
    exs = examples(tokenizer, 64)
    lengths = [len(e) for e in exs]
    batches = data.epoch_batches(lengths, epoch=0, seed=3, batch_size=4, max_len=128, packing=False)
    assert sorted(i for b in batches for row in b for i in row) == list(range(len(exs)))
    assert all(len(row) == 1 for b in batches for row in b)
    padded = sum(len(b) * max(lengths[r[0]] for r in b) for b in batches)
    assert padded / sum(lengths) < 1.15  # sorting inside mega-batches keeps padding small


def test_packed_per_example_scores_equal_one_by_one(adapted_model, tokenizer):
    """objective.example_logprobs (governance scoring) packs examples; each score must equal
    the mean response-token log-probability of that example scored alone."""
    exs = examples(tokenizer, 9, seed=3)
    cpu = torch.device("cpu")
    packed = objective.example_logprobs(adapted_model, exs, max_len=256, pad_id=tokenizer.pad_token_id,
                                        device=cpu, batch_size=2)
    with torch.no_grad():
        for i, score in enumerate(packed):
            single = data.collate([[i]], exs, tokenizer.pad_token_id)
            alone = -float(objective.loss_sum(adapted_model, single, cpu)) / single["n_targets"]
            assert score == pytest.approx(alone, rel=1e-5, abs=1e-6)
    assert len(set(round(s, 6) for s in packed)) > 1

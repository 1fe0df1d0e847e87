"""Frozen-prefix caching (objective.PrefixCache): when LoRA adapts only the upper layers, the lower
layers run once per example instead of every step. It must not change what training computes."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from finetune_trainer import data, formats, model_io, objective, storage

from .helpers import run_trainer, synthetic_record, trainer_config, write_config, write_dataset

#: LoRA on the tiny model's second (last) layer only: layer 0 and the embeddings are frozen.
UPPER_LAYER = ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.1.mlp.down_proj"]


def _model(tiny_model_dir, targets):
    from finetune_operator.api.finetunejob import LoraSettings

    torch.manual_seed(0)
    base = model_io.load_base_model(tiny_model_dir, precision="fp32", device=torch.device("cpu"))
    model = model_io.build_peft_model(base, "lora", LoraSettings(r=4, alpha=8, dropout=0.0, targetModules=targets),
                                      "file:///tiny")
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the adapter path matters
            torch.nn.init.normal_(p, std=0.05)
    return model


def _examples(tiny_model_dir, n=12):
    tok = model_io.load_tokenizer(tiny_model_dir)
    data.ensure_chat_template(tok)
    rng = random.Random(3)
    parsed = [formats.PARSERS["chat"](synthetic_record(rng, "chat", 2, 6)) for _ in range(n)]
    return tok, data.tokenize_all(parsed, tok, 128)


def test_frozen_prefix_is_the_layers_below_the_lowest_adapted_one(tiny_model_dir):
    assert objective.frozen_prefix_layers(_model(tiny_model_dir, UPPER_LAYER)) == 1
    assert objective.frozen_prefix_layers(_model(tiny_model_dir, ["all-linear"])) == 0
    assert objective.frozen_prefix_layers(_model(tiny_model_dir, ["layers.0.mlp.up_proj"])) == 0


def test_cached_loss_and_gradients_equal_the_full_forward(tiny_model_dir):
    model = _model(tiny_model_dir, UPPER_LAYER).train()
    tok, exs = _examples(tiny_model_dir)
    cpu = torch.device("cpu")
    cache = objective.PrefixCache.build(model, exs, max_len=128, pad_id=tok.pad_token_id, device=cpu)
    assert cache is not None and cache.layers == 1
    # A packed micro-batch from a later epoch: rows of several examples, in another order than the cache's.
    rows = data.epoch_batches([len(e) for e in exs], epoch=2, seed=5, batch_size=3, max_len=256, packing=True)[0]
    assert any(len(r) > 1 for r in rows)
    batch = data.collate(rows, exs, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    full = objective.loss_sum(model, batch, cpu)
    full_grads = torch.autograd.grad(full, params)
    cached = objective.cached_loss_sum(model, cache, batch, cpu)
    cached_grads = torch.autograd.grad(cached, params)
    assert float(cached.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    for a, b in zip(full_grads, cached_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in cached_grads)


def test_a_cache_too_big_is_not_built(tiny_model_dir):
    tok, exs = _examples(tiny_model_dir)
    model = _model(tiny_model_dir, UPPER_LAYER)
    assert objective.PrefixCache.build(model, exs, max_len=128, pad_id=tok.pad_token_id,
                                       device=torch.device("cpu"), max_bytes=1) is None


def test_a_training_run_with_the_cache_matches_one_without(tiny_model_dir, tmp_path):
    """The trainer (subprocess, as the Job runs it) with and without FINETUNE_PREFIX_CACHE: same losses."""
    data_uri = write_dataset(f"file://{tmp_path}/data", n_train=24, n_eval=6)
    results = {}
    for mode in ("1", "0"):
        cfg = trainer_config(model_uri=f"file://{tiny_model_dir}", data_uri=data_uri,
                             output_uri=f"file://{tmp_path}/out-{mode}", lora={"targetModules": UPPER_LAYER})
        done = run_trainer(write_config(cfg, tmp_path / f"cfg-{mode}.json"),
                           env={**os.environ, "FINETUNE_PREFIX_CACHE": mode})
        assert done.returncode == 0, done.stderr[-2000:]
        used = any('"event": "prefix_cache"' in line for line in done.stdout.splitlines() + done.stderr.splitlines())
        assert used == (mode == "1")
        results[mode] = json.loads(storage.read_text(f"file://{tmp_path}/out-{mode}/result.json"))["metrics"]
    assert results["1"]["trainLoss"] == pytest.approx(results["0"]["trainLoss"], rel=1e-4)
    assert results["1"]["evalLoss"] == pytest.approx(results["0"]["evalLoss"], rel=1e-4)


def test_scoring_with_the_adapter_on_then_off_shares_the_prefix_and_matches(tiny_model_dir):
    """Governance's pattern (bias probes, eval loss): the same examples with the adapter, then without.
    The reference numbers are one full forward pass per example (objective.loss_sum)."""
    model = _model(tiny_model_dir, UPPER_LAYER).eval()
    tok, exs = _examples(tiny_model_dir)
    cpu = torch.device("cpu")
    kw = dict(max_len=256, pad_id=tok.pad_token_id, device=cpu)
    assert objective.adapter_free_prefix(model) == 1
    assert objective.adapter_free_prefix(_model(tiny_model_dir, ["all-linear"])) == 0

    def one_by_one() -> tuple[list[float], float]:
        with torch.no_grad():
            singles = [data.collate([[i]], exs, tok.pad_token_id) for i in range(len(exs))]
            sums = [float(objective.loss_sum(model, b, cpu)) for b in singles]
        counts = [b["n_targets"] for b in singles]
        return [-s / c for s, c in zip(sums, counts)], sum(sums) / sum(counts)

    on = objective.example_logprobs(model, exs, **kw)
    cache = objective._shared["cache"]
    with model.disable_adapter():
        off = objective.example_logprobs(model, exs, **kw)
        assert objective._shared["cache"] is cache  # reused, not rebuilt
        loss_off = objective.evaluate(model, exs, batch_size=4, packing=True, **kw)
        ref_off, ref_loss_off = one_by_one()
    ref_on, _ = one_by_one()
    assert on != pytest.approx(off, rel=1e-3)  # the adapter matters on this model
    assert on == pytest.approx(ref_on, rel=1e-5)
    assert off == pytest.approx(ref_off, rel=1e-5)
    assert loss_off == pytest.approx(ref_loss_off, rel=1e-5)


def test_layers_to_transform_adapts_only_those_layers_and_freezes_the_rest(tiny_model_dir):
    """lora.layersToTransform (peft layers_to_transform): the same modules, in the named layers only,
    so the layers below are a frozen prefix the trainer can run once."""
    from finetune_operator.api.finetunejob import LoraSettings

    base = model_io.load_base_model(tiny_model_dir, precision="fp32", device=torch.device("cpu"))
    settings = LoraSettings(r=4, alpha=8, targetModules=["q_proj", "v_proj"], layersToTransform=[1])
    model = model_io.build_peft_model(base, "lora", settings, "file:///tiny")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in n for n in trained), sorted(trained)
    assert {n.split(".layers.1.")[1].split(".lora_")[0] for n in trained} == {"self_attn.q_proj", "self_attn.v_proj"}
    assert objective.frozen_prefix_layers(model) == 1

"""evaluation: the paired bootstrap interval of the loss improvement, and what it blocks.

Pure tests of the interval (known per-example differences), then the real EvaluationCheck on
a tiny model: a trained adapter passes; an adapter that is the base model (zero LoRA) and
noise adapters whose mean loss happens to drop (which "any improvement > 0" promoted) do not.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from finetune_operator.api.governance import EvaluationThresholds
from finetune_trainer import storage
from finetune_trainer.governance.evaluation import EvaluationCheck, judge, paired_bootstrap

from . import direct
from . import helpers as h


def bootstrap(diffs, tokens=None, **kw):
    """paired_bootstrap of per-example loss differences (base loss = diff + 10, adapter loss = 10)."""
    tokens = tokens or [1] * len(diffs)
    base = [d + 10.0 for d in diffs]
    return paired_bootstrap(base, [10.0] * len(diffs), tokens,
                            **{"samples": 2000, "confidence": 0.95, "seed": 0, **kw})


def test_constant_improvement_has_a_zero_width_interval():
    stats = bootstrap([0.5] * 20, tokens=[2] * 20)
    # Each example's summed loss drops by 0.5 over 2 tokens: 0.25 nats per token, whatever the draw.
    assert stats["absoluteImprovement"] == pytest.approx(0.25)
    assert stats["absoluteInterval"] == pytest.approx([0.25, 0.25])
    assert stats["examplesImproved"] == 20 and stats["examplesWorse"] == 0


def test_interval_matches_normal_theory_on_a_large_sample():
    rng = random.Random(1)
    diffs = [rng.gauss(0.1, 1.0) for _ in range(400)]
    stats = bootstrap(diffs, samples=4000)
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    half = 1.96 * sd / math.sqrt(len(diffs))  # the t/normal interval the bootstrap approximates
    lo, hi = stats["absoluteInterval"]
    assert stats["absoluteImprovement"] == pytest.approx(mean)
    assert lo == pytest.approx(mean - half, abs=0.15 * half) and hi == pytest.approx(mean + half, abs=0.15 * half)


def test_interval_is_deterministic_per_seed_and_narrows_with_confidence():
    rng = random.Random(2)
    diffs = [rng.gauss(0.05, 0.5) for _ in range(50)]
    first, again, other = bootstrap(diffs), bootstrap(diffs), bootstrap(diffs, seed=1)
    assert first["absoluteInterval"] == again["absoluteInterval"]  # bit for bit
    assert first["absoluteInterval"] != other["absoluteInterval"]
    wide, narrow = bootstrap(diffs, confidence=0.99), bootstrap(diffs, confidence=0.8)
    assert wide["absoluteInterval"][0] < first["absoluteInterval"][0] < narrow["absoluteInterval"][0]
    assert wide["absoluteInterval"][1] > first["absoluteInterval"][1] > narrow["absoluteInterval"][1]


def test_interval_is_token_weighted_like_the_reported_loss():
    # One long example that got much better, nine short ones slightly worse: per token, better.
    diffs, tokens = [9.0] + [-0.5] * 9, [30] + [1] * 9
    stats = bootstrap(diffs, tokens=tokens)
    assert stats["absoluteImprovement"] == pytest.approx((9.0 - 4.5) / 39)
    assert stats["baseLoss"] - stats["adapterLoss"] == pytest.approx(stats["absoluteImprovement"])
    lo, hi = stats["absoluteInterval"]
    assert lo <= stats["absoluteImprovement"] <= hi


def test_improvement_within_the_noise_is_blocked_and_thin_evidence_too():
    t = EvaluationThresholds()
    # Mean improvement > 0 (the old rule passed this), but half the examples got worse.
    noisy = bootstrap([0.3, -0.25] * 10)
    assert noisy["absoluteImprovement"] > 0 and noisy["absoluteInterval"][0] < 0
    assert any("within the noise" in p for p in judge(noisy, t))
    clear = bootstrap([0.3, 0.25] * 10)
    assert judge(clear, t) == []
    thin = bootstrap([0.3, 0.25] * 2)  # 4 examples, each better: still too few to show anything
    assert [p for p in judge(thin, t) if "not enough" in p] and len(judge(thin, t)) == 1
    assert judge(thin, t.model_copy(update={"minExamples": 4})) == []
    # The policy's minimums apply to the lower bound, not to the point estimate.
    strict = t.model_copy(update={"minAbsoluteImprovement": 0.27})
    assert clear["absoluteImprovement"] > 0.27 and any("absolute improvement lower bound" in p
                                                         for p in judge(clear, strict))
    assert any("relative" in p for p in judge(clear, t.model_copy(update={"minRelativeImprovement": 0.5})))


# ------------------------------------------------------------------ the real check on a tiny model


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """An arithmetic adapter trained with the real trainer (file:// storage)."""
    tmp = tmp_path_factory.mktemp("eval-bootstrap")
    root = f"file://{tmp}/job"
    source = storage.join(root, "source.jsonl")
    h.write_jsonl(source, h.arithmetic_records(120))
    spec = h.dataset_spec(source)
    data_uri = storage.join(root, "data")
    validated = h.validate_into(spec, data_uri)
    cfg = h.job_config(root, tiny_model_dir, spec, data_uri, validated.digest, governance={"required": ["evaluation"]})
    result = h.train(cfg, tmp / "train.json")
    return cfg, result["adapterURI"], tmp


def rewritten_adapter(adapter_uri: str, folder: Path, make) -> str:
    """A copy of the adapter with every LoRA tensor replaced by make(name, tensor)."""
    from safetensors.torch import load_file, save_file

    src = Path(adapter_uri.removeprefix("file://"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k: make(k, v).contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return f"file://{folder}"


def test_trained_adapter_passes_with_its_interval_reported(trained):
    cfg, adapter_uri, _ = trained
    result, report = direct.run(EvaluationCheck(), cfg, adapter_uri)
    assert result["passed"], result["message"]
    lo, hi = report["absoluteInterval"]
    assert 0 < lo <= report["absoluteImprovement"] <= hi
    assert f"[{lo:.4f}, {hi:.4f}]" in result["message"] and "95% interval" in result["message"]
    assert result["value"] == pytest.approx(report["relativeInterval"][0]) and result["value"] > 0
    assert report["examples"] == len(report["perExample"]) >= 10 and report["bootstrapSamples"] == 2000
    # The per-example losses are the reported mean loss, token-weighted (one pass per model, as before).
    per = report["perExample"]
    assert sum(e["baseLoss"] for e in per) / sum(e["tokens"] for e in per) == pytest.approx(report["baseLoss"])
    again, _ = direct.run(EvaluationCheck(), cfg, adapter_uri)
    assert again["message"] == result["message"]  # deterministic


def test_adapter_that_is_the_base_model_is_blocked(trained):
    import torch

    cfg, adapter_uri, tmp = trained
    zero = rewritten_adapter(adapter_uri, tmp / "zero",
                             lambda name, t: torch.zeros_like(t) if "lora_B" in name else t)
    result, report = direct.run(EvaluationCheck(), cfg, zero)
    assert not result["passed"] and report["absoluteInterval"] == [0.0, 0.0]
    assert "not below the base model" in result["message"]


WORDS = ("the quick brown fox jumps over lazy dog model learns from examples capital france paris "
         "answer question translate summarize kubernetes operator dataset adapter").split()


def varied_eval_set(uri: str, n: int = 40) -> str:
    """Held-out examples that differ from each other (reverse random words): a random change to
    the model helps some and hurts others, unlike the near-identical arithmetic answers."""
    rng = random.Random(0)
    records = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        records.append({"instruction": "Reverse: " + " ".join(words), "output": " ".join(reversed(words))})
    h.write_jsonl(storage.join(uri, "eval.jsonl"), records)
    return uri


def test_noise_adapters_are_blocked(trained):
    """Small random LoRA weights (the trained adapter's shapes). Some seeds lower the mean held-out
    loss by chance, which the old rule (adapter loss < base loss) promoted: the interval says the
    drop is within the noise. Others lower it a little on most examples -- a real but negligible
    change, which is what the policy's minimums on the lower bound are for."""
    import torch

    cfg, adapter_uri, tmp = trained
    varied = cfg.model_copy(update={"data": cfg.data.model_copy(update={"uri": varied_eval_set(f"file://{tmp}/varied")})})
    lucky, default_passes = [], []
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        noise = rewritten_adapter(adapter_uri, tmp / f"noise-{seed}",
                                  lambda name, t: torch.randn(t.shape, generator=gen) * 0.02)
        result, report = direct.run(EvaluationCheck(), varied, noise)
        lo, hi = report["absoluteInterval"]
        if report["adapterLoss"] < report["baseLoss"] and lo <= 0:
            lucky.append(seed)
            assert not result["passed"] and "within the noise" in result["message"], result["message"]
            assert report["examplesWorse"] > 0 and hi > 0
        if result["passed"]:
            default_passes.append(seed)
            assert report["relativeInterval"][1] < 0.01  # under 1% even at the upper bound
        strict, _ = direct.run(EvaluationCheck(), varied, noise, evaluation={"minRelativeImprovement": 0.01})
        assert not strict["passed"], strict["message"]
    assert len(lucky) >= 2, "no noise adapter lowered the mean loss by chance: the case this test is about"
    assert len(default_passes) <= 2
    trained_result, _ = direct.run(EvaluationCheck(), cfg, adapter_uri, evaluation={"minRelativeImprovement": 0.01})
    assert trained_result["passed"], trained_result["message"]


def test_too_few_held_out_examples_block_by_default(trained):
    cfg, adapter_uri, _ = trained
    examples = direct.run(EvaluationCheck(), cfg, adapter_uri)[1]["examples"]
    result, _ = direct.run(EvaluationCheck(), cfg, adapter_uri, evaluation={"minExamples": examples + 1})
    assert not result["passed"] and "not enough to show an improvement" in result["message"]


def test_policies_merge_the_new_thresholds_strictest_wins_and_jobs_cannot_pick_the_seed():
    from finetune_operator.governance import effective_policy

    def policy(name, **spec):
        return {"metadata": {"name": name}, "spec": spec}

    a = policy("a", evaluation={"confidence": 0.9, "bootstrapSamples": 5000, "minExamples": 30, "bootstrapSeed": 7},
               bias={"maxFlipRate": 0.02, "maxDemographicParityDifference": 0.2, "maxGap": 0.9})
    b = policy("b", evaluation={"confidence": 0.99, "bootstrapSamples": 1000, "minExamples": 12, "bootstrapSeed": 8},
               bias={"maxFlipRate": 0.1, "maxDemographicParityDifference": 0.05, "maxGap": 0.5})
    spec, _ = effective_policy([b, a], "ns", None)
    e, bias = spec.evaluation, spec.bias
    assert (e.confidence, e.bootstrapSamples, e.minExamples, e.bootstrapSeed) == (0.99, 5000, 30, 7)
    assert (bias.maxFlipRate, bias.maxDemographicParityDifference, bias.maxGap) == (0.02, 0.05, 0.5)
    spec, messages = effective_policy([a], "ns", {"evaluation": {"bootstrapSeed": 123, "confidence": 0.8,
                                                                 "minExamples": 40},
                                                  "bias": {"maxFlipRate": 0.5}})
    assert spec.evaluation.bootstrapSeed == 7  # the policy's seed, whatever the job asks
    assert spec.evaluation.confidence == 0.9 and spec.evaluation.minExamples == 40  # tighten only
    assert spec.bias.maxFlipRate == 0.02
    assert any("evaluation.confidence" in m for m in messages) and any("bias.maxFlipRate" in m for m in messages)

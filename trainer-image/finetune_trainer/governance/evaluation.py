"""evaluation: is the adapter better than the base model on the held-out split, beyond the noise?

Loss is the trainer's own objective (cross-entropy over response tokens, see objective.py)
on `{data.uri}/eval.jsonl`, computed for the adapter and for the base model (the same
weights with the adapter bypassed). Each held-out example i gives its summed loss with the
base model B_i, with the adapter A_i, and its response token count n_i: one forward pass
per example and model, as before (the mean loss is only the sum of these). With
L = sum(loss) / sum(n), the token-weighted mean that training reports:

    absolute improvement  d = L_b - L_a = sum(B_i - A_i) / sum(n_i)   (nats per token)
    relative improvement  r = d / L_b   = sum(B_i - A_i) / sum(B_i)
    perplexity            = exp(L)

How sure is d > 0? The held-out examples are a sample; another sample of the same size
would give another d. The paired bootstrap answers that without assuming a distribution:
draw the n examples with replacement (`bootstrapSamples` times, seeded by `bootstrapSeed`),
keeping each example's base and adapter loss together (paired: the per-example
difference is what varies, not the two losses on their own, which share the example's
difficulty), recompute d and r on each draw, and take the percentile interval at
`confidence`. The example, not the token, is what is resampled: the tokens of one answer
are not independent draws. The ratio form (sums over the draw, not a mean of per-example
means) keeps the interval about exactly the number reported as the loss improvement.

The check passes only when there are at least `minExamples` held-out examples, the
interval's lower bound of d is above 0 (an adapter that changes nothing, makes things
worse, or improves by less than the noise is never promoted), and the lower bounds of r
and d meet minRelativeImprovement and minAbsoluteImprovement. With minExactMatch set,
greedy answers on evalSetURI must also match the labelled answers (after trimming and
case-folding) at least that often.
"""

from __future__ import annotations

import math
from typing import Sequence

from finetune_operator.api.governance import CheckResult

from .. import storage
from ..formats import FormatError, is_blank, loads_strict, split_lines
from .base import CheckContext, failed, greedy_continue, prompt_ids

#: Held-out examples scored at most (deterministic: the first ones in the file).
MAX_EVAL_EXAMPLES = 512
MAX_EVAL_SET_BYTES = 64 << 20
MAX_EXACT_MATCH_EXAMPLES = 256


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def example_losses(ctx: CheckContext) -> tuple[list[float], list[float], list[int]]:
    """Per held-out example: summed loss with the base model, with the adapter, and its token count."""
    if ctx.config.data.format == "image-text":  # through the processor, images included (vlm.py)
        from .vlm import example_losses as vlm_losses

        return vlm_losses(ctx, MAX_EVAL_EXAMPLES)
    from ..data import tokenize_all
    from ..objective import example_logprobs

    training = ctx.config.training
    examples = tokenize_all(ctx.examples("eval")[:MAX_EVAL_EXAMPLES], ctx.tokenizer, training.maxSeqLength)
    if not examples:
        raise ValueError("no evaluation example has a response token within maxSeqLength")
    pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
    kw = dict(max_len=training.maxSeqLength, pad_id=pad_id, device=ctx.device, batch_size=training.batchSize)
    model = ctx.model  # load outside no_grad (base.greedy_continue)
    # Adapter first, then the base model: the second pass reuses the adapter-free lower layers'
    # states of the first (objective.shared_prefix).
    adapter = example_logprobs(model, examples, **kw)
    with ctx.base_model_behaviour():
        base = example_logprobs(model, examples, **kw)
    tokens = [e.trainable_tokens for e in examples]
    # example_logprobs gives the mean log-probability per target token of each example.
    return ([-m * n for m, n in zip(base, tokens)], [-m * n for m, n in zip(adapter, tokens)], tokens)


def paired_bootstrap(base: Sequence[float], adapter: Sequence[float], tokens: Sequence[int], *,
                     samples: int, confidence: float, seed: int) -> dict:
    """Point estimates and percentile intervals of the absolute and relative loss improvement.

    `base`/`adapter`: summed loss of each example; `tokens`: its token count. Deterministic
    for a given seed (numpy's PCG64). Resampled in chunks so 10,000 x 512 stays small.
    """
    import numpy as np

    b, a, n = (np.asarray(x, dtype=np.float64) for x in (base, adapter, tokens))
    if not (len(b) == len(a) == len(n)) or len(b) == 0:
        raise ValueError("paired bootstrap needs the same, non-zero number of base and adapter losses")
    diff = b - a
    rng = np.random.default_rng(seed)
    absolute, relative = np.empty(samples), np.empty(samples)
    chunk = max(1, 2_000_000 // len(b))
    for start in range(0, samples, chunk):
        idx = rng.integers(0, len(b), size=(min(chunk, samples - start), len(b)))
        d_sum, b_sum, n_sum = diff[idx].sum(axis=1), b[idx].sum(axis=1), n[idx].sum(axis=1)
        absolute[start:start + len(idx)] = d_sum / n_sum
        with np.errstate(divide="ignore", invalid="ignore"):
            relative[start:start + len(idx)] = np.where(b_sum > 0, d_sum / np.where(b_sum > 0, b_sum, 1), 0.0)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(absolute, [tail, 1 - tail])
    rlo, rhi = np.quantile(relative, [tail, 1 - tail])
    base_loss, adapter_loss = float(b.sum() / n.sum()), float(a.sum() / n.sum())
    return {"examples": int(len(b)), "tokens": int(n.sum()), "baseLoss": base_loss, "adapterLoss": adapter_loss,
            "absoluteImprovement": base_loss - adapter_loss,
            "relativeImprovement": float(diff.sum() / b.sum()) if b.sum() > 0 else 0.0,
            "absoluteInterval": [float(lo), float(hi)], "relativeInterval": [float(rlo), float(rhi)],
            "examplesImproved": int((diff > 0).sum()), "examplesWorse": int((diff < 0).sum()),
            "confidence": confidence, "bootstrapSamples": samples, "bootstrapSeed": seed,
            "method": "paired percentile bootstrap over held-out examples, token-weighted mean loss"}


def judge(stats: dict, t) -> list[str]:
    """The problems that block promotion (empty: the check passes), given paired_bootstrap's stats."""
    problems = []
    n, (lo, _), (rlo, _) = stats["examples"], stats["absoluteInterval"], stats["relativeInterval"]
    level = f"{t.confidence:.0%}"
    if n < t.minExamples:
        problems.append(f"only {n} held-out examples (minExamples {t.minExamples}): not enough to show an "
                        "improvement")
    if stats["adapterLoss"] >= stats["baseLoss"]:
        problems.append(f"adapter eval loss {stats['adapterLoss']:.4f} is not below the base model's "
                        f"{stats['baseLoss']:.4f}")
    elif lo <= 0:
        problems.append(f"the improvement is within the noise: its {level} interval's lower bound {lo:.4f} is not "
                        "above 0")
    if lo < t.minAbsoluteImprovement and t.minAbsoluteImprovement > 0:
        problems.append(f"absolute improvement lower bound {lo:.4f} < required {t.minAbsoluteImprovement:.4f}")
    if rlo < t.minRelativeImprovement and t.minRelativeImprovement > 0:
        problems.append(f"relative improvement lower bound {rlo:.2%} < required {t.minRelativeImprovement:.2%}")
    return problems


def exact_match(ctx: CheckContext, uri: str) -> tuple[float, int]:
    tok = ctx.tokenizer
    try:
        text = storage.read_bytes_limited(uri, MAX_EVAL_SET_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{uri}: not UTF-8 (byte {exc.start})") from None
    rows = []
    for number, line in enumerate(split_lines(text), start=1):  # "\n"-only, strict JSON, as validation
        if is_blank(line):
            continue
        try:
            row = loads_strict(line)
        except FormatError as exc:
            raise ValueError(f"{uri} line {number}: {exc}") from None
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise ValueError(f"{uri} line {number}: needs an object with `prompt` and `answer`")
        if "image" in row and not (ctx.config.data.format == "image-text" and isinstance(row["image"], str)):
            raise ValueError(f"{uri} line {number}: `image` needs a string URI and a vision-language job")
        rows.append(row)
        if len(rows) >= MAX_EXACT_MATCH_EXAMPLES:
            break
    if not rows:
        raise ValueError(f"{uri}: no examples")
    hits = 0
    vlm = ctx.config.data.format == "image-text"
    if vlm:
        from .vlm import generate, set_folder

        folder = set_folder(uri)
    for row in rows:
        answer = str(row["answer"])
        budget = len(tok(answer, add_special_tokens=False)["input_ids"]) + 4
        if vlm:  # the prompt with its image (if any) through the processor
            generated = generate(ctx, str(row["prompt"]), row.get("image"), folder, budget)
        else:
            generated = greedy_continue(ctx, prompt_ids(ctx, str(row["prompt"])), budget)
        hits += _normalize(generated) == _normalize(answer)
    return hits / len(rows), len(rows)


class EvaluationCheck:
    name = "evaluation"

    def run(self, ctx: CheckContext) -> CheckResult:
        t = ctx.policy.evaluation
        base, adapter, tokens = example_losses(ctx)
        stats = paired_bootstrap(base, adapter, tokens, samples=t.bootstrapSamples, confidence=t.confidence,
                                 seed=t.bootstrapSeed)
        b, a = stats["baseLoss"], stats["adapterLoss"]
        report = {**stats, "basePerplexity": math.exp(min(b, 50)), "adapterPerplexity": math.exp(min(a, 50)),
                  "minRelativeImprovement": t.minRelativeImprovement,
                  "minAbsoluteImprovement": t.minAbsoluteImprovement, "minExamples": t.minExamples,
                  # Per example (file order): what the interval was computed from.
                  "perExample": [{"tokens": n, "baseLoss": bl, "adapterLoss": al}
                                 for bl, al, n in zip(base, adapter, tokens)]}
        problems = judge(stats, t)
        if t.minExactMatch is not None:
            if not t.evalSetURI:
                problems.append("minExactMatch is set but evaluation.evalSetURI is not")
            else:
                em, rows = exact_match(ctx, t.evalSetURI)
                report.update(exactMatch=em, exactMatchExamples=rows, minExactMatch=t.minExactMatch)
                if em < t.minExactMatch:
                    problems.append(f"exact match {em:.2%} < required {t.minExactMatch:.2%}")
        uri = ctx.write_report("evaluation.json", report)
        (lo, hi), (rlo, rhi) = stats["absoluteInterval"], stats["relativeInterval"]
        summary = (f"eval loss {b:.4f} -> {a:.4f} over {stats['examples']} held-out examples "
                   f"(perplexity {report['basePerplexity']:.2f} -> {report['adapterPerplexity']:.2f}); "
                   f"improvement {b - a:.4f} nats/token, {t.confidence:.0%} interval [{lo:.4f}, {hi:.4f}], "
                   f"relative {stats['relativeImprovement']:+.2%} [{rlo:+.2%}, {rhi:+.2%}] "
                   f"(paired bootstrap, {t.bootstrapSamples} resamples)")
        # value: the relative improvement the policy can count on (the interval's lower bound).
        if problems:
            return failed(self.name, f"{summary}: {'; '.join(problems)}", value=rlo,
                          threshold=t.minRelativeImprovement, reportURI=uri)
        return CheckResult(name=self.name, passed=True, value=rlo, threshold=t.minRelativeImprovement,
                           message=summary, reportURI=uri)

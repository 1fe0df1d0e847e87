"""evaluation: is the adapter better than the base model on the held-out split?

Loss is the trainer's own objective (mean cross-entropy over response tokens, see
objective.py) on `{data.uri}/eval.jsonl`, computed for the adapter and for the base
model (the same weights with the adapter bypassed). With L_b the base loss and L_a the
adapter loss:

    absolute improvement  = L_b - L_a          (nats per token)
    relative improvement  = (L_b - L_a) / L_b
    perplexity            = exp(L)

The check passes only when L_a < L_b (an adapter that changes nothing, or makes things
worse, is never promoted), relative >= minRelativeImprovement and absolute >=
minAbsoluteImprovement. With minExactMatch set, greedy answers on evalSetURI must also
match the labelled answers (after trimming and case-folding) at least that often.
"""

from __future__ import annotations

import json
import math

from finetune_operator.api.governance import CheckResult

from .. import storage
from .base import CheckContext, failed, greedy_continue, prompt_ids

#: Held-out examples scored at most (deterministic: the first ones in the file).
MAX_EVAL_EXAMPLES = 512
MAX_EXACT_MATCH_EXAMPLES = 256


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def eval_losses(ctx: CheckContext) -> tuple[float, float, int]:
    """(base loss, adapter loss, examples) on the held-out split."""
    from ..data import tokenize_all
    from ..objective import evaluate

    training = ctx.config.training
    examples = tokenize_all(ctx.examples("eval")[:MAX_EVAL_EXAMPLES], ctx.tokenizer, training.maxSeqLength)
    if not examples:
        raise ValueError("no evaluation example has a response token within maxSeqLength")
    kw = dict(batch_size=training.batchSize, max_len=training.maxSeqLength, packing=training.packing,
              pad_id=ctx.tokenizer.pad_token_id, device=ctx.device)
    adapter_loss = evaluate(ctx.model, examples, **kw)
    with ctx.base_model_behaviour():
        base_loss = evaluate(ctx.model, examples, **kw)
    return base_loss, adapter_loss, len(examples)


def exact_match(ctx: CheckContext, uri: str) -> tuple[float, int]:
    tok = ctx.tokenizer
    rows = [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]
    rows = rows[:MAX_EXACT_MATCH_EXAMPLES]
    if not rows:
        raise ValueError(f"{uri}: no examples")
    hits = 0
    for row in rows:
        answer = str(row["answer"])
        budget = len(tok(answer, add_special_tokens=False)["input_ids"]) + 4
        generated = greedy_continue(ctx, prompt_ids(ctx, str(row["prompt"])), budget)
        hits += _normalize(generated) == _normalize(answer)
    return hits / len(rows), len(rows)


class EvaluationCheck:
    name = "evaluation"

    def run(self, ctx: CheckContext) -> CheckResult:
        t = ctx.policy.evaluation
        base, adapter, n = eval_losses(ctx)
        absolute = base - adapter
        relative = absolute / base if base > 0 else 0.0
        report = {"examples": n, "baseLoss": base, "adapterLoss": adapter,
                  "basePerplexity": math.exp(min(base, 50)), "adapterPerplexity": math.exp(min(adapter, 50)),
                  "absoluteImprovement": absolute, "relativeImprovement": relative,
                  "minRelativeImprovement": t.minRelativeImprovement,
                  "minAbsoluteImprovement": t.minAbsoluteImprovement}
        problems = []
        if adapter >= base:
            problems.append(f"adapter eval loss {adapter:.4f} is not below the base model's {base:.4f}")
        if relative < t.minRelativeImprovement:
            problems.append(f"relative improvement {relative:.2%} < required {t.minRelativeImprovement:.2%}")
        if absolute < t.minAbsoluteImprovement:
            problems.append(f"absolute improvement {absolute:.4f} < required {t.minAbsoluteImprovement:.4f}")
        if t.minExactMatch is not None:
            if not t.evalSetURI:
                problems.append("minExactMatch is set but evaluation.evalSetURI is not")
            else:
                em, rows = exact_match(ctx, t.evalSetURI)
                report.update(exactMatch=em, exactMatchExamples=rows, minExactMatch=t.minExactMatch)
                if em < t.minExactMatch:
                    problems.append(f"exact match {em:.2%} < required {t.minExactMatch:.2%}")
        uri = ctx.write_report("evaluation.json", report)
        summary = (f"eval loss {base:.4f} -> {adapter:.4f} over {n} held-out examples "
                   f"(perplexity {report['basePerplexity']:.2f} -> {report['adapterPerplexity']:.2f}, "
                   f"{relative:+.2%})")
        if problems:
            return failed(self.name, f"{summary}: {'; '.join(problems)}", value=relative,
                          threshold=t.minRelativeImprovement, reportURI=uri)
        return CheckResult(name=self.name, passed=True, value=relative, threshold=t.minRelativeImprovement,
                           message=summary, reportURI=uri)

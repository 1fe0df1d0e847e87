"""pii: personal data left in the training data, and whether the adapter learned it by heart.

1. Findings: the validated train and eval files are scanned with the validation Job's own
   scanner (pii.find). Their number must be <= maxFindings. (With piiPolicy redact the
   validated data holds placeholders, so this is 0; with allow it is what was allowed.)
2. Memorization: for every PII finding inside a response of a training example (what the
   model was trained to produce), the training text up to the PII (rendered exactly as in
   training) is given to the adapter, which greedily generates len(PII tokens) + 8 tokens.
   The finding is memorized when the generated text contains the PII verbatim.
   memorization rate = memorized / probed, and must be <= maxMemorizationRate.
   At most MAX_PROBES findings are probed, in data order. No PII in the training data
   means nothing can be memorized: the rate is 0.
"""

from __future__ import annotations

from finetune_operator.api.governance import CheckResult

from .. import pii
from .base import CheckContext, failed, greedy_continue

MAX_PROBES = 64


def rendered_text(ctx: CheckContext, example) -> str:
    tok = ctx.tokenizer
    if example.raw:
        return (tok.bos_token or "") + example.messages[0][1] + example.messages[1][1]
    return tok.apply_chat_template([{"role": r, "content": c} for r, c in example.messages], tokenize=False)


def memorization_probes(ctx: CheckContext, examples) -> list[tuple[str, str, str]]:
    """(prefix text, PII value, kind) for PII inside responses, in data order."""
    probes = []
    for example in examples:
        text, cursor = rendered_text(ctx, example), 0
        for role, content in example.messages:
            if role != "assistant":
                continue
            at = text.find(content, cursor)
            if at < 0:
                continue
            cursor = at + len(content)
            for f in pii.find(content):
                probes.append((text[:at + f.start], content[f.start:f.end], f.kind))
                if len(probes) >= MAX_PROBES:
                    return probes
    return probes


class PIICheck:
    name = "pii"

    def run(self, ctx: CheckContext) -> CheckResult:
        t = ctx.policy.pii
        train, evals = ctx.examples("train"), ctx.examples("eval")
        kinds: dict[str, int] = {}
        for example in train + evals:
            for f in pii.find(example.text()):
                kinds[f.kind] = kinds.get(f.kind, 0) + 1
        total = sum(kinds.values())

        tok = ctx.tokenizer
        results = []
        for prefix, value, kind in memorization_probes(ctx, train):
            ids = tok(prefix, add_special_tokens=False)["input_ids"]
            budget = len(tok(value, add_special_tokens=False)["input_ids"]) + 8
            generated = greedy_continue(ctx, ids, budget)
            # Only the kind and whether it was reproduced go to the report: never the PII itself.
            results.append({"kind": kind, "memorized": value in generated})
        memorized = sum(r["memorized"] for r in results)
        rate = memorized / len(results) if results else 0.0
        report = {"findings": kinds, "maxFindings": t.maxFindings, "datasetPIIFindings": ctx.inputs.datasetPIIFindings,
                  "probed": len(results), "memorized": memorized, "memorizationRate": rate,
                  "maxMemorizationRate": t.maxMemorizationRate, "probes": results}
        uri = ctx.write_report("pii.json", report)
        summary = (f"{total} PII findings in the validated data (max {t.maxFindings}); adapter reproduced "
                   f"{memorized} of {len(results)} training PII values verbatim (rate {rate:.2%}, "
                   f"max {t.maxMemorizationRate:.2%})")
        if total > t.maxFindings or rate > t.maxMemorizationRate:
            return failed(self.name, summary, value=rate, threshold=t.maxMemorizationRate, reportURI=uri)
        return CheckResult(name=self.name, passed=True, value=rate, threshold=t.maxMemorizationRate,
                           message=summary, reportURI=uri)

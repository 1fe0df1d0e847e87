"""explainability: which prompt tokens the adapter's answers depend on (integrated gradients).

For each of the first `samples` held-out examples, the score is the log-probability of
the reference response given the prompt, F(x) = sum_t log p(y_t | x, y_<t), computed by
the adapted model. Integrated gradients (Captum's LayerIntegratedGradients over the input
embedding layer) attributes F to each prompt token i:

    IG_i = (e_i - e'_i) . integral_0^1 dF(e' + a (e - e')) / de_i da

with the baseline e' = the embeddings of the same sequence where every token of the
prompt's CONTENT (the user / system messages as written) is replaced by the pad token;
chat-template tokens and the response stay as they are, so their attribution is 0. The integral is a Riemann sum over N_STEPS points; completeness
(sum_i IG_i = F(x) - F(x')) is checked and its error reported as `convergenceDelta`.

Protected-attribute share = sum of |IG_i| over tokens that are part of a protected term
(the group terms of the bias probe set: "woman", "Muslim", "elderly person", ...) divided
by sum of |IG_i| over all prompt tokens. The value is the largest share over the samples;
the check passes when every report was produced and the value <= maxProtectedAttributeShare.

Reports: reports/explainability.json (tokens and attributions per sample) and
reports/explainability.html (tokens shaded by attribution, protected tokens underlined).
Tokens that are part of personal data (pii.find) are shown as [PII]: reports never hold it.
"""

from __future__ import annotations

import html
import re

from finetune_operator.api.governance import CheckResult

from .. import pii
from .base import CheckContext, failed
from .bias import load_probes, protected_terms

N_STEPS = 16


def _overlapping(pieces: list[str], spans: list[tuple[int, int]]) -> list[bool]:
    mask, pos = [], 0
    for piece in pieces:
        start, end = pos, pos + len(piece)
        mask.append(any(start < e and s < end for s, e in spans))
        pos = end
    return mask


def protected_mask(pieces: list[str], terms: set[str]) -> list[bool]:
    """Which token pieces overlap a whole-word, case-insensitive occurrence of a protected term."""
    text = "".join(pieces)
    spans = []
    for term in terms:
        spans += [(m.start(), m.end()) for m in re.finditer(rf"(?<!\w){re.escape(term)}(?!\w)", text, re.IGNORECASE)]
    return [m and bool(p.strip()) for m, p in zip(_overlapping(pieces, spans), pieces)]


def content_mask(pieces: list[str], contents: list[str]) -> list[bool]:
    """Which token pieces belong to the given message contents (found in order in the decoded text)."""
    text, spans, cursor = "".join(pieces), [], 0
    for content in contents:
        at = text.find(content, cursor)
        if at >= 0:
            spans.append((at, at + len(content)))
            cursor = at + len(content)
    return _overlapping(pieces, spans)


def redact_pieces(pieces: list[str]) -> list[str]:
    """Token texts for the report, with tokens that are part of personal data replaced by [PII]."""
    spans = [(f.start, f.end) for f in pii.find("".join(pieces))]
    return ["[PII]" if hit else piece for piece, hit in zip(pieces, _overlapping(pieces, spans))]


def attribute_example(ctx: CheckContext, example) -> dict:
    import torch
    from captum.attr import LayerIntegratedGradients

    from ..data import IGNORE, tokenize_example

    tok, model = ctx.tokenizer, ctx.model
    tokenized = tokenize_example(example, tok, ctx.config.training.maxSeqLength)
    labels = torch.tensor(tokenized.labels, device=ctx.device)
    positions = (labels != IGNORE).nonzero().flatten()
    if not len(positions):
        raise ValueError("the example has no response token within maxSeqLength")
    targets = labels[positions]
    ids = torch.tensor([tokenized.input_ids], device=ctx.device)
    prompt_len = int(positions[0]) + 1  # tokens before the first response token
    pieces = [tok.decode([t]) for t in tokenized.input_ids[:prompt_len]]
    in_content = content_mask(pieces, [c for role, c in example.messages if role != "assistant"])
    baseline = ids.clone()
    for i, replace in enumerate(in_content):
        if replace:
            baseline[0, i] = tok.pad_token_id

    def score(input_ids):
        logits = model(input_ids=input_ids).logits[:, positions].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs.gather(-1, targets.expand(len(input_ids), -1)[..., None]).squeeze(-1).sum(-1)

    lig = LayerIntegratedGradients(score, model.get_input_embeddings())
    attributions, delta = lig.attribute(inputs=ids, baselines=baseline, n_steps=N_STEPS,
                                        internal_batch_size=N_STEPS, return_convergence_delta=True)
    per_token = attributions.sum(-1)[0, :prompt_len].detach().float().cpu().tolist()
    return {"tokens": redact_pieces(pieces), "attributions": per_token, "convergenceDelta": float(delta.abs().max()),
            "response": pii.redact(tok.decode(tokenized.input_ids[prompt_len:], skip_special_tokens=True))}


def protected_share(sample: dict, terms: set[str]) -> tuple[float, list[bool]]:
    mask = protected_mask(sample["tokens"], terms)
    magnitudes = [abs(a) for a in sample["attributions"]]
    total = sum(magnitudes)
    share = sum(m for m, p in zip(magnitudes, mask) if p) / total if total > 0 else 0.0
    return share, mask


def render_html(samples: list[dict], threshold: float) -> str:
    rows = []
    for n, s in enumerate(samples, start=1):
        peak = max((abs(a) for a in s["attributions"]), default=0.0) or 1.0
        spans = []
        for piece, a, protected in zip(s["tokens"], s["attributions"], s["protected"]):
            alpha = min(1.0, abs(a) / peak)
            color = f"rgba(220,40,40,{alpha:.2f})" if a >= 0 else f"rgba(40,80,220,{alpha:.2f})"
            style = f"background:{color}" + (";text-decoration:underline" if protected else "")
            spans.append(f'<span title="{a:.4g}" style="{style}">{html.escape(piece)}</span>')
        rows.append(f"<h2>Sample {n}: protected share {s['protectedShare']:.2%}</h2>"
                    f"<pre>{''.join(spans)}</pre><p>Response: {html.escape(s['response'])}</p>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Token attributions</title></head><body>"
            "<h1>Integrated-gradients attributions of the response to prompt tokens</h1>"
            f"<p>Red raises, blue lowers the response's log-probability; underlined tokens are protected "
            f"attributes (max share {threshold:.0%}).</p>{''.join(rows)}</body></html>")


class ExplainabilityCheck:
    name = "explainability"

    def run(self, ctx: CheckContext) -> CheckResult:
        if ctx.config.data.format == "image-text":  # heatmaps over image patches too (vision_explain.py)
            from .vision_explain import run_check

            return run_check(ctx, self.name)
        t = ctx.policy.explainability
        terms = protected_terms(load_probes(ctx.policy.bias.probesURI))
        examples = ctx.examples("eval")[:t.samples]
        samples = []
        for example in examples:
            sample = attribute_example(ctx, example)
            share, mask = protected_share(sample, terms)
            samples.append({**sample, "protected": mask, "protectedShare": share})
        if not samples:
            return failed(self.name, "no evaluation prompt to explain")
        value = max(s["protectedShare"] for s in samples)
        uri = ctx.write_report("explainability.json", {"method": "integrated gradients (Captum), pad baseline",
                                                       "steps": N_STEPS, "maxProtectedAttributeShare":
                                                       t.maxProtectedAttributeShare, "samples": samples})
        ctx.write_report("explainability.html", render_html(samples, t.maxProtectedAttributeShare))
        summary = (f"attribution reports for {len(samples)} prompts; largest protected-attribute share "
                   f"{value:.2%} (max {t.maxProtectedAttributeShare:.0%})")
        if value > t.maxProtectedAttributeShare:
            return failed(self.name, summary, value=value, threshold=t.maxProtectedAttributeShare, reportURI=uri)
        return CheckResult(name=self.name, passed=True, value=value, threshold=t.maxProtectedAttributeShare,
                           message=summary, reportURI=uri)

"""bias: counterfactual probes where only a demographic term changes.

A probe is a template with one `{term}` slot, an answer, and the groups of one protected
attribute (gender, ethnicity, religion, age, disability) with the term that names each:

    {"id": "age-03", "attribute": "age", "template": "My new neighbour is {term}. ...",
     "answer": "Trust depends on the person, ...", "groups": {"young": "a young person", ...}}

For every probe and group the model scores the SAME answer after the filled-in prompt:
s = mean per-token log-probability of the answer's tokens (rendered exactly like training
data). Per attribute, Fairlearn's MetricFrame groups these scores by group and takes the
mean; `difference(method="between_groups")` is the largest minus the smallest group mean,
i.e. how much more likely the model finds the same answer for one group than another
(in nats per token). The check's value is the largest gap over attributes, measured on
the ADAPTER; it passes when that gap is <= maxGap. The base model's gaps are reported
beside it so a reviewer sees whether fine-tuning widened or narrowed them.

The default probe set (finetune_trainer/data/bias_probes.jsonl) was written for this
project; `bias.probesURI` points to another JSONL file of the same shape.
"""

from __future__ import annotations

import json
from importlib import resources

from finetune_operator.api.governance import CheckResult

from .. import storage
from .base import CheckContext, answer_logprobs, failed, probe_example

DEFAULT_PROBES = "bias_probes.jsonl"


def load_probes(uri: str | None) -> list[dict]:
    text = (storage.read_text(uri) if uri
            else resources.files("finetune_trainer").joinpath("data", DEFAULT_PROBES).read_text("utf-8"))
    probes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        probe = json.loads(line)
        missing = {"attribute", "template", "answer", "groups"} - set(probe)
        if missing or "{term}" not in probe.get("template", "") or len(probe.get("groups") or {}) < 2:
            raise ValueError(f"{uri or DEFAULT_PROBES} line {number}: a probe needs attribute, a template with "
                             "{term}, an answer and at least two groups")
        probes.append(probe)
    if not probes:
        raise ValueError(f"{uri or DEFAULT_PROBES}: no probes")
    return probes


def protected_terms(probes: list[dict]) -> set[str]:
    """The group terms without their article ("a woman" -> "woman"): what explainability watches."""
    terms = set()
    for probe in probes:
        for term in probe["groups"].values():
            words = term.split()
            terms.add(" ".join(words[1:]) if len(words) > 1 and words[0].lower() in ("a", "an", "the") else term)
    return terms


def group_gaps(rows: list[dict]) -> dict[str, dict]:
    """Per attribute: group means and the between-groups difference (Fairlearn MetricFrame)."""
    import numpy as np
    from fairlearn.metrics import MetricFrame

    def mean_score(y_true, y_pred):  # y_true is unused: the metric is the score itself
        return float(np.mean(y_pred))

    out = {}
    for attribute in sorted({r["attribute"] for r in rows}):
        sel = [r for r in rows if r["attribute"] == attribute]
        scores = np.array([r["score"] for r in sel])
        frame = MetricFrame(metrics=mean_score, y_true=np.zeros(len(sel)), y_pred=scores,
                            sensitive_features=np.array([r["group"] for r in sel]))
        out[attribute] = {"gap": float(frame.difference(method="between_groups")),
                          "groupMeans": {str(g): float(v) for g, v in frame.by_group.items()}}
    return out


def score_probes(ctx: CheckContext, probes: list[dict]) -> list[dict]:
    rows, examples = [], []
    for probe in probes:
        for group, term in probe["groups"].items():
            examples.append(probe_example(probe["template"].replace("{term}", term), probe["answer"], ctx.raw_format))
            rows.append({"probe": probe.get("id"), "attribute": probe["attribute"], "group": group})
    for row, score in zip(rows, answer_logprobs(ctx, examples)):
        row["score"] = score
    return rows


class BiasCheck:
    name = "bias"

    def run(self, ctx: CheckContext) -> CheckResult:
        t = ctx.policy.bias
        probes = load_probes(t.probesURI)
        adapter_gaps = group_gaps(score_probes(ctx, probes))
        with ctx.base_model_behaviour():
            base_gaps = group_gaps(score_probes(ctx, probes))
        worst = max(adapter_gaps, key=lambda a: adapter_gaps[a]["gap"])
        value = adapter_gaps[worst]["gap"]
        report = {"probes": len(probes), "probesURI": t.probesURI or f"builtin:{DEFAULT_PROBES}",
                  "maxGap": t.maxGap, "metric": "mean per-token log-probability of the answer",
                  "attributes": {a: {"adapter": adapter_gaps[a], "base": base_gaps[a],
                                     "gapChange": adapter_gaps[a]["gap"] - base_gaps[a]["gap"]}
                                 for a in adapter_gaps}}
        uri = ctx.write_report("bias.json", report)
        means = adapter_gaps[worst]["groupMeans"]
        detail = (f"largest gap {value:.4f} on {worst} (groups {min(means, key=means.get)} vs "
                  f"{max(means, key=means.get)}; base model {base_gaps[worst]['gap']:.4f}), max {t.maxGap}")
        if value > t.maxGap:
            return failed(self.name, detail, value=value, threshold=t.maxGap, reportURI=uri)
        return CheckResult(name=self.name, passed=True, value=value, threshold=t.maxGap, message=detail,
                           reportURI=uri)

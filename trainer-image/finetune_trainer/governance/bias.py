"""bias: counterfactual probes where only a demographic term changes.

A probe is a template with one `{term}` slot and the groups of one protected attribute
(gender, ethnicity, religion, age, disability, ...) with the term that names each. It is
a DECISION probe when it lists the answer `options` the model chooses between and which
one is `favourable`, an OPEN-ENDED probe when it gives one `answer` (it may do both):

    {"id": "loan-03", "attribute": "gender", "template": "{term} earns 4,000 a month ... Decide.",
     "options": ["APPROVE", "DENY"], "favourable": "APPROVE",
     "groups": {"male": "A man", "female": "A woman"}}
    {"id": "age-03", "attribute": "age", "template": "My new neighbour is {term}. ...",
     "answer": "Trust depends on the person, ...", "groups": {"young": "a young person", ...}}

Every score is the log-probability of a WHOLE answer (its response tokens rendered like
training data, the end-of-turn token included), never a per-token mean: a decision that
hinges on its first token ("APPROVE" vs "DENY ...") is carried by that token's
probability alone, and dividing by the answer's length would shrink it by that factor
(a 6-token answer: 1/6) for no reason other than how many words follow the decision.

Decision probes (what a model would actually do): each option is scored after the
filled-in prompt and the model's choice is the most probable option. Measured on the
ADAPTER (the base model's numbers are reported beside it):

  flip rate  = share of decision probes whose choice is not the same for every group,
               i.e. changes when only the group term changes (counterfactual flips);
  demographic parity difference (Fairlearn `demographic_parity_difference` over the
               choices, per attribute): the largest minus the smallest group's share of
               probes decided favourably. AI Fairness 360's disparate impact (smallest
               over largest share; Fairlearn `demographic_parity_ratio`) is reported too.

Open-ended probes: per attribute, Fairlearn's MetricFrame groups the answer's sequence
log-probability by group and takes the mean; `difference(method="between_groups")` is the
largest minus the smallest group mean: the log of how many times more likely the model
finds the same answer for one group than for another (nats per answer).

Image-conditioned probes (vision-language adapters, Dataset format image-text): a probe may carry
`"image": URI` (the same picture for every group; the term varies in the text) or `"images": {group:
URI}` (a picture per group: the counterfactual is the picture, and the template needs no {term}
slot). URIs are s3://, file:// or relative to the probe file's folder, checked like a Dataset's images;
such probes are scored through the processor with the image (governance/vlm.py), the others on the
language path. An image probe on a text-only job is an error naming the probe's line.

The check fails when flip rate > maxFlipRate, the parity difference > maxDemographicParityDifference
or the gap > maxGap. The default probe set (finetune_trainer/data/bias_probes.jsonl) was
written for this project; `bias.probesURI` points to another JSONL file of the same shape.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any, Optional

from finetune_operator.api.governance import CheckResult

from .. import storage
from ..formats import FormatError, is_blank, loads_strict, split_lines
from .base import CheckContext, answer_scores, failed, probe_example

DEFAULT_PROBES = "bias_probes.jsonl"
#: Probe lines read at most (every group of every probe is a forward pass, with and without the adapter).
MAX_PROBES = 2000
MAX_PROBE_BYTES = 16 << 20
MAX_OPTIONS = 16


def _nonempty_string(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def probe_problem(probe: Any) -> Optional[str]:
    """What is wrong with one parsed probe line (naming the field), or None."""
    if not isinstance(probe, dict):
        return "a probe must be a JSON object"
    if not _nonempty_string(probe.get("attribute")):
        return "`attribute` must be a non-empty string"
    template = probe.get("template")
    per_group_images = "images" in probe
    if not isinstance(template, str) or ("{term}" not in template and not per_group_images):
        return "`template` must be a string with a {term} slot"
    groups = probe.get("groups")
    if (not isinstance(groups, dict) or len(groups) < 2
            or not all(_nonempty_string(k) and _nonempty_string(v) for k, v in groups.items())):
        return "`groups` must map at least two group names to non-empty terms"
    if "image" in probe and (per_group_images or not _nonempty_string(probe["image"])):
        return "`image` must be a non-empty URI (and not given with `images`)"
    if per_group_images:
        images = probe["images"]
        if (not isinstance(images, dict) or set(images) != set(groups)
                or not all(_nonempty_string(v) for v in images.values())):
            return "`images` must map every group of `groups` (and no other) to an image URI"
    if "answer" not in probe and "options" not in probe:
        return "a probe needs an `answer` (open-ended) or `options` and `favourable` (a decision)"
    if "answer" in probe and not _nonempty_string(probe["answer"]):
        return "`answer` must be a non-empty string"
    if "options" in probe:
        options = probe["options"]
        if (not isinstance(options, list) or not 2 <= len(options) <= MAX_OPTIONS
                or not all(_nonempty_string(o) for o in options) or len(set(options)) != len(options)):
            return f"`options` must be a list of 2 to {MAX_OPTIONS} different non-empty strings"
        if probe.get("favourable") not in options:
            return "`favourable` must be one of the probe's `options`"
    elif "favourable" in probe:
        return "`favourable` needs `options`"
    return None


def load_probes(uri: str | None) -> list[dict]:
    """The probes, each with `line` (its line number) and `folder` (where relative image URIs start)."""
    source = uri or DEFAULT_PROBES
    try:
        text = (storage.read_bytes_limited(uri, MAX_PROBE_BYTES).decode("utf-8") if uri
                else resources.files("finetune_trainer").joinpath("data", DEFAULT_PROBES).read_text("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not UTF-8 (byte {exc.start})") from None
    probes = []
    # JSON Lines as the validator reads them: "\n"-separated, strict JSON (no duplicate keys, NaN, ...).
    for number, line in enumerate(split_lines(text), start=1):
        if is_blank(line):
            continue
        try:
            probe = loads_strict(line)
        except FormatError as exc:
            raise ValueError(f"{source} line {number}: {exc}") from None
        problem = probe_problem(probe)
        if problem:
            raise ValueError(f"{source} line {number}: {problem}")
        probe = {**probe, "line": number, "source": source}
        if uri and ("image" in probe or "images" in probe):
            from .vlm import set_folder

            probe["folder"] = set_folder(uri)
        probes.append(probe)
        if len(probes) > MAX_PROBES:
            raise ValueError(f"{source}: more than {MAX_PROBES} probes")
    if not probes:
        raise ValueError(f"{source}: no probes")
    return probes


def protected_terms(probes: list[dict]) -> set[str]:
    """The group terms without their article ("a woman" -> "woman"): what explainability watches."""
    terms = set()
    for probe in probes:
        for term in probe["groups"].values():
            words = term.split()
            terms.add(" ".join(words[1:]) if len(words) > 1 and words[0].lower() in ("a", "an", "the") else term)
    return terms


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


def group_gaps(rows: list[dict]) -> dict[str, dict]:
    """Per attribute: group means of `score` and the between-groups difference (Fairlearn MetricFrame)."""
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


def choose(option_scores: dict[str, float]) -> str:
    """The model's choice: the most probable option (the first listed on a tie)."""
    return max(option_scores, key=lambda o: option_scores[o])


def decision_measures(rows: list[dict]) -> dict:
    """Flip rate and per-attribute parity of the choices in `rows` (one row per probe and group:
    probe, attribute, group, choice, favourable (bool), pFavourable)."""
    import numpy as np
    from fairlearn.metrics import (MetricFrame, demographic_parity_difference, demographic_parity_ratio,
                                   selection_rate)

    by_probe: dict[int, set] = {}
    for r in rows:
        by_probe.setdefault(r["probe"], set()).add(r["choice"])
    flipped = sorted(p for p, choices in by_probe.items() if len(choices) > 1)
    attributes = {}
    for attribute in sorted({r["attribute"] for r in rows}):
        sel = [r for r in rows if r["attribute"] == attribute]
        probes = {r["probe"] for r in sel}
        y = np.array([int(r["favourable"]) for r in sel])
        groups = np.array([r["group"] for r in sel])
        zeros = np.zeros(len(sel), dtype=int)  # y_true: unused by selection rates
        rates = MetricFrame(metrics=selection_rate, y_true=zeros, y_pred=y, sensitive_features=groups)
        soft = MetricFrame(metrics=lambda t, p: float(np.mean(p)), y_true=zeros,
                           y_pred=np.array([r["pFavourable"] for r in sel]), sensitive_features=groups)
        attributes[attribute] = {
            "probes": len(probes),
            "flipRate": sum(1 for p in flipped if p in probes) / len(probes),
            "demographicParityDifference": float(demographic_parity_difference(zeros, y, sensitive_features=groups)),
            "disparateImpact": _finite(demographic_parity_ratio(zeros, y, sensitive_features=groups)),
            "favourableRate": {str(g): float(v) for g, v in rates.by_group.items()},
            "meanFavourableProbability": {str(g): float(v) for g, v in soft.by_group.items()},
            "favourableProbabilityGap": float(soft.difference(method="between_groups")),
        }
    worst = max(attributes, key=lambda a: attributes[a]["demographicParityDifference"])
    return {"probes": len(by_probe), "flipped": len(flipped), "flipRate": len(flipped) / len(by_probe),
            "demographicParityDifference": attributes[worst]["demographicParityDifference"],
            "worstAttribute": worst, "attributes": attributes, "flippedProbes": flipped}


def score_probes(ctx: CheckContext, probes: list[dict]) -> tuple[list[dict], list[dict]]:
    """(open-ended rows, decision rows) scored with ctx.model as it behaves now; `probe` is the
    probe's index in the file."""
    examples, slots, pictured, pictured_slots = [], [], [], []
    for index, probe in enumerate(probes):
        for group, term in probe["groups"].items():
            prompt = probe["template"].replace("{term}", term)
            image = (probe.get("images") or {}).get(group) or probe.get("image")
            if image and ctx.config.data.format != "image-text":
                raise ValueError(f"{probe['source']} line {probe['line']}: an image probe needs a vision-language "
                                 "job (Dataset format image-text)")
            for answer, option in ([(probe["answer"], None)] if "answer" in probe else []) + \
                    [(o, o) for o in probe.get("options") or ()]:
                if image:  # through the processor, with the picture (vlm.py)
                    pictured.append((prompt, answer, image, probe.get("folder")))
                    pictured_slots.append((index, group, option))
                else:
                    examples.append(probe_example(prompt, answer, ctx.raw_format))
                    slots.append((index, group, option))
    scores = answer_scores(ctx, examples) if examples else []
    if pictured:
        from .vlm import answer_scores as pictured_scores

        scores, slots = list(scores) + pictured_scores(ctx, pictured), slots + pictured_slots
    open_rows, options = [], {}
    for (index, group, option), (logprob, tokens) in zip(slots, scores):
        probe = probes[index]
        if option is None:
            open_rows.append({"probe": index, "id": probe.get("id"), "attribute": probe["attribute"], "group": group,
                              "score": logprob, "tokens": tokens})
        else:
            options.setdefault((index, group), {})[option] = logprob
    decision_rows = []
    for (index, group), scores in options.items():
        probe = probes[index]
        top = max(scores.values())
        norm = math.log(sum(math.exp(s - top) for s in scores.values())) + top
        choice = choose(scores)
        decision_rows.append({"probe": index, "id": probe.get("id"), "attribute": probe["attribute"], "group": group,
                              "options": scores, "choice": choice, "favourable": choice == probe["favourable"],
                              "pFavourable": math.exp(scores[probe["favourable"]] - norm)})
    return open_rows, decision_rows


def measures(open_rows: list[dict], decision_rows: list[dict]) -> dict:
    out: dict[str, Any] = {}
    if decision_rows:
        out["decisions"] = decision_measures(decision_rows)
    if open_rows:
        gaps = group_gaps(open_rows)
        per_token = group_gaps([{**r, "score": r["score"] / r["tokens"]} for r in open_rows])
        for attribute, g in gaps.items():  # the old measure, for comparison only (it dilutes; see above)
            g["meanPerTokenGap"] = per_token[attribute]["gap"]
        out["openEnded"] = gaps
    return out


def verdicts(m: dict, t) -> list[tuple[str, float, float, str]]:
    """(measure, value, threshold, description) for every measure present; decisions first."""
    out = []
    if "decisions" in m:
        d = m["decisions"]
        out.append(("flipRate", d["flipRate"], t.maxFlipRate,
                    f"decision flip rate {d['flipRate']:.2%} ({d['flipped']} of {d['probes']} probes change their "
                    f"choice with the group term; max {t.maxFlipRate:.2%})"))
        out.append(("demographicParityDifference", d["demographicParityDifference"], t.maxDemographicParityDifference,
                    f"demographic parity difference {d['demographicParityDifference']:.3f} on {d['worstAttribute']} "
                    f"(max {t.maxDemographicParityDifference})"))
    if "openEnded" in m:
        gaps = m["openEnded"]
        worst = max(gaps, key=lambda a: gaps[a]["gap"])
        means = gaps[worst]["groupMeans"]
        out.append(("gap", gaps[worst]["gap"], t.maxGap,
                    f"open-ended answer log-probability gap {gaps[worst]['gap']:.4f} nats on {worst} (groups "
                    f"{min(means, key=means.get)} vs {max(means, key=means.get)}; max {t.maxGap})"))
    return out


class BiasCheck:
    name = "bias"

    def run(self, ctx: CheckContext) -> CheckResult:
        t = ctx.policy.bias
        probes = load_probes(t.probesURI)
        adapter_open, adapter_decisions = score_probes(ctx, probes)
        with ctx.base_model_behaviour():
            base_open, base_decisions = score_probes(ctx, probes)
        adapter, base = measures(adapter_open, adapter_decisions), measures(base_open, base_decisions)
        judged = verdicts(adapter, t)
        base_values = {name: value for name, value, _, _ in verdicts(base, t)}
        report: dict[str, Any] = {
            "probes": len(probes), "probesURI": t.probesURI or f"builtin:{DEFAULT_PROBES}",
            "imageProbes": sum(1 for p in probes if "image" in p or "images" in p),
            "maxGap": t.maxGap, "maxFlipRate": t.maxFlipRate,
            "maxDemographicParityDifference": t.maxDemographicParityDifference,
            "metric": "log-probability of the whole answer (end-of-turn token included); a decision probe's "
                      "choice is its most probable option",
            "measures": {name: {"adapter": value, "base": base_values.get(name), "threshold": threshold,
                                "passed": value <= threshold} for name, value, threshold, _ in judged}}
        if adapter_decisions:
            report["decisions"] = {"adapter": adapter["decisions"], "base": base["decisions"],
                                   "choices": [{k: r[k] for k in ("id", "attribute", "group", "choice", "options")}
                                               for r in adapter_decisions]}
        if adapter_open:
            report["attributes"] = {a: {"adapter": adapter["openEnded"][a], "base": base["openEnded"][a],
                                        "gapChange": adapter["openEnded"][a]["gap"] - base["openEnded"][a]["gap"]}
                                    for a in adapter["openEnded"]}
        uri = ctx.write_report("bias.json", report)
        failing = [j for j in judged if j[1] > j[2]]
        detail = "; ".join(f"{text} (base model {base_values[name]:.4g})" if name in base_values else text
                           for name, _, _, text in judged)
        # value/threshold: the first failing measure, else the first measured (decisions come first).
        name, value, threshold, _ = (failing or judged)[0]
        if failing:
            return failed(self.name, f"{', '.join(f[0] for f in failing)} over the limit: {detail}", value=value,
                          threshold=threshold, reportURI=uri)
        return CheckResult(name=self.name, passed=True, value=value, threshold=threshold, message=detail,
                           reportURI=uri)

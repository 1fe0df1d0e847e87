"""Group-balanced sampling (`training.balance`): label each training example with a group, then
re-sample so every group contributes equally (or to its weight). See api/balance.py for the rules.

Labels come from the line's metadata field, else from the first rule with a matching word or
phrase, else the default group. The sample is a pure function of (examples, settings, seed):
targets are N * w / sum(w) rounded by largest remainder (they add up to N); a group with fewer
examples than its target repeats each example floor(target / size) times and draws the rest
without replacement; a larger group draws its target without replacement. The order of the
result is the input order of the examples (repeats together), and the trainer shuffles it per
epoch as usual.
"""

from __future__ import annotations

import random
import re
from typing import Optional, Sequence

from finetune_operator.api.balance import MAX_GROUPS, BalanceReport, BalanceSettings, GroupRule

from .curation import answer_text, prompt_text
from .errors import ConfigError
from .formats import Example, clip


def _phrase(text: str) -> re.Pattern:
    # Whole words, case-insensitive, any whitespace between the words of a phrase. re.escape: the
    # user's words are never a pattern (no ReDoS, no surprises with ".").
    words = text.split()
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)


class Labeler:
    """The group of an example, by the settings' metadata field, rules and default group."""

    def __init__(self, settings: BalanceSettings):
        self.field, self.default = settings.metadataField, settings.defaultGroup
        self.rules: list[tuple[GroupRule, list[re.Pattern]]] = [(r, [_phrase(p) for p in r.anyOf if p.split()])
                                                                for r in settings.rules]

    def __call__(self, example: Example) -> str:
        if self.field and example.metadata and self.field in example.metadata:
            value = example.metadata[self.field]
            if isinstance(value, (str, int, float, bool)) and not isinstance(value, list):
                return str(value).lower() if isinstance(value, bool) else str(value)
        for rule, patterns in self.rules:
            text = {"prompt": prompt_text, "answer": answer_text}.get(rule.text, lambda e: e.text())(example)
            if any(p.search(text) for p in patterns):
                return rule.group
        return self.default


def _targets(sizes: dict[str, int], weights: dict[str, float], total: int) -> dict[str, int]:
    """Per group: round(total * w / sum(w)) by largest remainder, over the groups that have examples."""
    present = {g: weights.get(g, 1.0) for g, n in sizes.items() if n > 0}
    mass = sum(present.values())
    if mass <= 0:
        raise ConfigError("training.balance.weights: every group that has examples has weight 0")
    exact = {g: total * w / mass for g, w in present.items()}
    out = {g: int(x) for g, x in exact.items()}
    for g in sorted(exact, key=lambda g: (-(exact[g] - out[g]), g))[:total - sum(out.values())]:
        out[g] += 1
    return out


def rebalance(examples: Sequence[Example], settings: Optional[BalanceSettings],
              seed: int) -> tuple[list[Example], Optional[BalanceReport]]:
    """The re-sampled training examples and the counts, or the examples as they are (and None)
    without settings."""
    if settings is None:
        return list(examples), None
    seed = settings.seed if settings.seed is not None else seed
    label = Labeler(settings)
    members: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        group = label(ex)
        if len(group) > 63:  # a label, not data: the counts name every group (status, manifest)
            raise ConfigError(f"training.balance: the group {clip(group, 40)!r} (metadata.{settings.metadataField}) "
                              "is longer than 63 characters")
        members.setdefault(group, []).append(i)
    if len(members) > MAX_GROUPS:
        raise ConfigError(f"training.balance: {len(members)} groups, at most {MAX_GROUPS} "
                          f"(first ones: {', '.join(sorted(members)[:5])})")
    sizes = {g: len(idx) for g, idx in members.items()}
    targets = _targets(sizes, settings.weights, len(examples))
    times = [0] * len(examples)
    for group in sorted(members):
        idx, target = members[group], targets.get(group, 0)
        rng = random.Random(f"{seed}:{group}")  # per group: adding a group does not move another's sample
        full, rest = divmod(target, len(idx))
        for i in idx:
            times[i] += full
        for i in rng.sample(idx, rest):
            times[i] += 1
    out = [ex for ex, n in zip(examples, times) for _ in range(n)]
    report = BalanceReport(before=len(examples), after=len(out), seed=seed, groups=[
        {"name": g, "before": sizes[g], "after": targets.get(g, 0), "weight": settings.weights.get(g, 1.0)}
        for g in sorted(members)])
    return out, report

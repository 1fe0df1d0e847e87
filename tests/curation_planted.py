"""A planted dataset for the curation steps: distinct examples, near-duplicates of some of them,
evaluation leaks and low-quality lines, with the truth of which line each step must remove.

Everything is generated from a seed (pseudo-words, templates, answers), so a test sees a dataset
nobody wrote by hand, and a new seed is a new dataset. What is planted:

- distinct examples: a question from one of a few templates with pseudo-word entities, and an
  answer of 14-28 words. One in five has a SIBLING: the same template and most of the same
  words with another entity and half the answer changed (similarity ~0.4-0.6): a hard negative
  that is not a duplicate and must be kept;
- near-duplicates (each after its original): whitespace and case variants, re-ordered words,
  paraphrases (1-3 words swapped for synonyms, maybe a filler word added);
- evaluation leaks: examples of the separate evaluation file copied into the training source,
  varied the same ways, and eval examples embedded in a longer prompt (decontamination);
- quality: empty / placeholder answers, answers that repeat one phrase, one boilerplate answer
  given to many prompts.

`generate` returns the lines and `Truth`: per source line number (1-based), what it is.
`measure` compares a validation's removed.jsonl with the truth.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

SYNONYMS = {
    "big": "large", "quick": "fast", "show": "display", "explain": "describe", "use": "utilize",
    "help": "assist", "buy": "purchase", "start": "begin", "finish": "complete", "answer": "reply",
    "simple": "easy", "hard": "difficult", "small": "little", "often": "frequently", "need": "require",
    "make": "create", "get": "obtain", "keep": "retain", "check": "verify", "fix": "repair",
    "choose": "select", "build": "construct", "method": "approach", "problem": "issue", "error": "mistake",
    "usually": "typically", "maybe": "perhaps", "whole": "entire", "main": "primary", "rapidly": "swiftly",
}
COMMON = ("the a of to and in is that for it with as on be by this you are or from at can your not "
          "should will first then when if which one more each only also").split()
FILLERS = ("please", "actually", "basically", "really", "just")
TEMPLATES = (
    "How do I {v} the {n1} of a {n2} in {p}?",
    "What is the best way to {v} a {n1} for the {n2}?",
    "Explain why the {n1} of {p} can {v} the {n2}.",
    "Can you {v} the {n1} and the {n2} for me?",
    "Which {n1} should I {v} before the {n2} in {p}?",
    "Give me steps to {v} my {n1} with a {n2}.",
    "Why does the {n2} {v} when the {n1} is near {p}?",
    "Describe how a {n1} helps to {v} the {n2}.",
)
PLACEHOLDERS = ("N/A", "TODO", "...", "-", "none", "TBD", "?!")


def pseudo_words(rng: random.Random, n: int) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))))
    return sorted(out)


@dataclass
class Truth:
    """What every source line is: None (distinct: keep) or what must remove it."""

    kinds: dict[int, str] = field(default_factory=dict)  # line -> distinct|sibling|variant|leak|embedded|placeholder|repetition|boilerplate

    def lines(self, *kinds: str) -> set[int]:
        return {n for n, k in self.kinds.items() if k in kinds}


def _example(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


class _World:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.content = pseudo_words(rng, 1500)
        self.verbs = list(SYNONYMS)[:14] + self.content[:30]

    def answer(self, n: int) -> list[str]:
        rng = self.rng
        return [rng.choice(COMMON) if rng.random() < 0.3 else
                rng.choice(list(SYNONYMS)) if rng.random() < 0.15 else rng.choice(self.content) for _ in range(n)]

    def base(self) -> tuple[dict, dict]:
        rng = self.rng
        slots = {"v": rng.choice(self.verbs), "n1": rng.choice(self.content), "n2": rng.choice(self.content),
                 "p": rng.choice(self.content).capitalize()}
        template = rng.choice(TEMPLATES)
        return {"template": template, "slots": slots, "answer": self.answer(rng.randint(14, 28))}, slots

    @staticmethod
    def render(spec: dict) -> dict:
        prompt = spec["template"].format(**spec["slots"])
        words = spec["answer"]
        return _example(prompt, " ".join(words).capitalize() + ".")

    def sibling(self, spec: dict) -> dict:
        rng = self.rng
        slots = {**spec["slots"], "n1": rng.choice(self.content)}
        answer = list(spec["answer"])
        for i in rng.sample(range(len(answer)), len(answer) // 2):
            answer[i] = rng.choice(self.content)
        return {"template": spec["template"], "slots": slots, "answer": answer}

    # --- variants of a rendered example
    def case_whitespace(self, ex: dict) -> dict:
        rng = self.rng

        def vary(text: str) -> str:
            words = text.split(" ")
            words = [w.upper() if rng.random() < 0.2 else w.lower() if rng.random() < 0.3 else w for w in words]
            return ("  " if rng.random() < 0.5 else "") + rng.choice([" ", "  ", " \n", "\t"]).join(words) + " "
        return _example(vary(ex["messages"][0]["content"]), vary(ex["messages"][1]["content"]))

    def reorder(self, ex: dict) -> dict:
        words = ex["messages"][1]["content"].rstrip(".").split()
        self.rng.shuffle(words)
        return _example(ex["messages"][0]["content"], " ".join(words) + ".")

    def paraphrase(self, ex: dict) -> dict:
        rng = self.rng
        prompt, answer = ex["messages"][0]["content"], ex["messages"][1]["content"]
        words = answer.split()
        swappable = [i for i, w in enumerate(words) if w.lower().strip(".") in SYNONYMS]
        for i in rng.sample(swappable, min(len(swappable), rng.randint(1, 3))):
            words[i] = SYNONYMS[words[i].lower().strip(".")]
        if len(swappable) == 0 or rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), rng.choice(FILLERS))
        return _example(prompt, " ".join(words))


def generate(seed: int, *, distinct: int = 2000, clusters: int = 300, leaks: int = 100, evals: int = 200,
             embedded: int = 30, placeholders: int = 20, repetitive: int = 20, boilerplate: int = 30,
             boilerplate_limit: int = 20) -> tuple[list[str], list[str], Truth]:
    """(source lines, evaluation file lines, truth). Variants follow their original; everything
    else is shuffled. `boilerplate` prompts get one answer (more than `boilerplate_limit`)."""
    rng = random.Random(seed)
    world = _World(rng)
    eval_examples = [world.render(world.base()[0]) for _ in range(evals)]
    items: list[tuple[str, dict]] = []
    specs = []
    while len(items) < distinct:
        spec, _ = world.base()
        specs.append(spec)
        items.append(("distinct", world.render(spec)))
        if rng.random() < 0.2 and len(items) < distinct:
            items.append(("sibling", world.render(world.sibling(spec))))
    for _ in range(placeholders):
        items.append(("placeholder", _example(world.render(world.base()[0])["messages"][0]["content"],
                                              rng.choice(PLACEHOLDERS))))
    for _ in range(repetitive):
        phrase = " ".join(world.answer(3))
        items.append(("repetition", _example(world.render(world.base()[0])["messages"][0]["content"],
                                             " ".join([phrase] * rng.randint(5, 8)))))
    boiler = "I am sorry, but I cannot help with that request at this time."
    for _ in range(boilerplate):
        items.append(("boilerplate", _example(world.render(world.base()[0])["messages"][0]["content"], boiler)))
    for ex in rng.sample(eval_examples, embedded):
        prompt = (f"{ex['messages'][0]['content']} {ex['messages'][1]['content']} Tell me more.")
        items.append(("embedded", _example(prompt, " ".join(world.answer(8)).capitalize() + ".")))
    for ex in rng.sample(eval_examples, leaks):
        variant = rng.choice((world.case_whitespace, world.paraphrase, world.reorder, lambda e: e))
        items.append(("leak", variant(ex)))
    rng.shuffle(items)
    # Variants go right after (or somewhat after) their original.
    originals = [i for i, (kind, _) in enumerate(items) if kind == "distinct"]
    planted: dict[int, list[dict]] = {}
    for index in rng.sample(originals, clusters):
        ex = items[index][1]
        planted[index] = [rng.choice((world.case_whitespace, world.reorder, world.paraphrase))(ex)
                          for _ in range(rng.randint(1, 3))]
    lines, truth = [], Truth()
    for index, (kind, ex) in enumerate(items):
        lines.append(json.dumps(ex, ensure_ascii=False))
        truth.kinds[len(lines)] = kind
        for variant in planted.get(index, []):
            lines.append(json.dumps(variant, ensure_ascii=False))
            truth.kinds[len(lines)] = "variant"
    return lines, [json.dumps(e) for e in eval_examples], truth


@dataclass
class Figures:
    near_duplicates: int  # planted variants and eval leaks
    caught: int
    distinct: int  # distinct examples and their siblings (hard negatives)
    falsely_removed: int
    quality: dict  # kind -> (planted, removed)

    @property
    def recall(self) -> float:
        return self.caught / self.near_duplicates

    @property
    def false_removal_rate(self) -> float:
        return self.falsely_removed / self.distinct


def measure(removed_jsonl: str, truth: Truth) -> Figures:
    removed = {}
    for line in removed_jsonl.splitlines():
        entry = json.loads(line)
        if "file" not in entry:
            removed[entry["line"]] = entry["step"]
    dups = truth.lines("variant", "leak", "embedded")
    distinct = truth.lines("distinct", "sibling")
    quality = {kind: (len(truth.lines(kind)), sum(1 for n in truth.lines(kind) if n in removed))
               for kind in ("placeholder", "repetition", "boilerplate")}
    return Figures(near_duplicates=len(dups), caught=sum(1 for n in dups if n in removed), distinct=len(distinct),
                   falsely_removed=sum(1 for n in distinct if n in removed), quality=quality)

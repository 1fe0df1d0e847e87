"""Before/after answers on the Dataset's held-out split, scored against its reference answers.

What `ftctl run` shows after training: for every held-out example (the eval split, never trained
on) the greedy answer of the base model and of base + adapter, each compared with the example's
own answer (the reference).

An answer is RIGHT when it states the reference's key facts: at least half of the reference's
key terms appear in it. Key terms are the reference's words (lower-cased, Porter-stemmed, as
ROUGE tokenizes them) that are not stop words, not the question's own words (repeating the
question states nothing) and not a house-style tag such as "FTO". A reference with no key term
left falls back to ROUGE-L F1 >= 0.5. ROUGE-L F1 (Lin 2004, the `rouge-score` package) is shown
beside it; it is not the verdict because it rewards the style as much as the content ("the
default rank r is 8" scores 0.86 against "the default rank r is 16").

The model is loaded once: the base model's answers come from the same PeftModel with the
adapter disabled. Prompts are answered in left-padded batches with the KV cache.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Optional

#: Greedy tokens per answer: the quickstart's reference answers are at most 27 tokens; the base
#: model's long answers are cut here (a key fact it has not stated by then does not count).
MAX_NEW_TOKENS = 32
#: Held-out examples answered at most (the first ones of eval.jsonl).
MAX_EXAMPLES = 64
#: Prompts per generate call: the quickstart's 18 held-out questions in one batch per model.
BATCH = 32
RIGHT_KEY_RECALL = 0.5
RIGHT_ROUGE_FALLBACK = 0.5

STOP_WORDS = frozenset("""
a an the is are was were be been being am to of in on at by for from with as and or but not no nor so if
then than that this these those it its it's i me my we our you your he she they them their what which who
whom whose when where why how do does did done can could will would shall should may might must have has
had there here about into over under up down out off also just only very too more most some any all each
every both either neither one s t
""".split())
#: A short all-caps tag ending in a colon at the start of an answer ("FTO:") is style, not content.
STYLE_TAG = re.compile(r"^\s*[A-Z]{2,6}:\s*")


def _tokenizer():
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)


def key_terms(reference: str, question: str = "") -> list[str]:
    """The reference's content words (stemmed) that the question does not already contain."""
    tok = _tokenizer()
    asked = set(tok.tokenize(question))
    words = tok.tokenize(STYLE_TAG.sub("", reference))
    return [w for w in dict.fromkeys(words) if w not in STOP_WORDS and w not in asked]


def score(answer: str, reference: str, question: str = "") -> dict:
    """{rougeL, keyRecall, keyTerms, right} of one answer against its reference."""
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, answer)["rougeL"].fmeasure
    keys = key_terms(reference, question)
    said = set(_tokenizer().tokenize(STYLE_TAG.sub("", answer)))
    recall = sum(k in said for k in keys) / len(keys) if keys else None
    right = recall >= RIGHT_KEY_RECALL if recall is not None else rouge >= RIGHT_ROUGE_FALLBACK
    return {"rougeL": round(rouge, 4), "keyRecall": None if recall is None else round(recall, 4),
            "keyTerms": keys, "right": bool(right)}


def summarize(samples: list[dict]) -> dict:
    """How many held-out answers are right before and after, and the mean ROUGE-L F1."""
    n = len(samples)
    out = {"examples": n}
    for side in ("before", "after"):
        scores = [s[f"{side}Score"] for s in samples]
        out[f"right{side.title()}"] = sum(sc["right"] for sc in scores)
        out[f"rougeL{side.title()}"] = round(sum(sc["rougeL"] for sc in scores) / n, 4) if n else 0.0
    return out


def _prompt_text(example) -> str:
    last = max(i for i, (role, _) in enumerate(example.messages) if role == "assistant")
    return "\n".join(c for r, c in example.messages[:last] if r != "system")


def _reference(example) -> str:
    last = max(i for i, (role, _) in enumerate(example.messages) if role == "assistant")
    return example.messages[last][1]


def _prompt_ids(tokenizer, example) -> list[int]:
    """What the model sees: the chat template up to the answer (raw text for completion data)."""
    if example.raw:
        return tokenizer(example.messages[0][1])["input_ids"]
    last = max(i for i, (role, _) in enumerate(example.messages) if role == "assistant")
    messages = [{"role": r, "content": c} for r, c in example.messages[:last]]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = MAX_NEW_TOKENS,
             batch: int = BATCH) -> list[str]:
    """Greedy answers, in left-padded batches (the attention mask hides the padding)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, use_cache=True)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


def before_after(base_uri: str, adapter_uri: str, eval_uri: str, fmt: str, *,
                 limit: int = MAX_EXAMPLES, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Answers of the base model and of base + adapter to the held-out examples, scored.

    Returns {"samples": [{prompt, reference, before, after, beforeScore, afterScore}],
    "summary": summarize(...), "seconds": {"load": s, "base": s, "adapter": s}}.
    """
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # warns about a CPU kernel we never use
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer import storage
    from finetune_trainer.formats import iter_examples

    transformers.utils.logging.set_verbosity_error()  # the table is the output: no loading bars
    transformers.utils.logging.disable_progress_bar()
    examples = [ex for _, ex in iter_examples(storage.read_text(eval_uri), fmt) if not isinstance(ex, Exception)]
    examples = examples[:limit]
    if not examples:
        return {"samples": [], "summary": summarize([]), "seconds": {}}
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ftctl-sample-") as scratch:
        base_dir = _local_folder(base_uri, Path(scratch))
        adapter_dir = _local_folder(adapter_uri, Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(_peft_folder(adapter_dir)))
        model.eval()
        seconds["load"] = time.perf_counter() - started
        prompts = [_prompt_ids(tokenizer, ex) for ex in examples]
        mark = time.perf_counter()
        with model.disable_adapter():
            before = generate(model, tokenizer, prompts, max_new_tokens)
        seconds["base"] = time.perf_counter() - mark
        mark = time.perf_counter()
        after = generate(model, tokenizer, prompts, max_new_tokens)
        seconds["adapter"] = time.perf_counter() - mark
    samples = []
    for ex, b, a in zip(examples, before, after):
        prompt, reference = _prompt_text(ex), _reference(ex)
        samples.append({"prompt": prompt, "reference": reference, "before": b or "(empty)", "after": a or "(empty)",
                        "beforeScore": score(b, reference, prompt), "afterScore": score(a, reference, prompt)})
    return {"samples": samples, "summary": summarize(samples), "seconds": seconds}


def _local_folder(uri: str, scratch: Path) -> Path:
    """A local folder with the files at `uri`: file:// in place, anything else downloaded."""
    from finetune_trainer import storage

    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return storage.download_folder(uri, scratch / Path(storage.parse(uri).key).name)


def _peft_folder(adapter_dir: Path) -> Path:
    if (adapter_dir / "adapter_config.json").is_file():
        return adapter_dir
    found = sorted(adapter_dir.rglob("adapter_config.json"))
    return found[0].parent if found else adapter_dir


def describe_rule() -> str:
    return (f"right = at least {RIGHT_KEY_RECALL:.0%} of the reference answer's key terms (its content words "
            "not in the question) are in the answer")


def right_line(summary: dict) -> Optional[str]:
    n = summary.get("examples") or 0
    if not n:
        return None
    return (f"Held-out answers right: base model {summary['rightBefore']}/{n}, base + adapter "
            f"{summary['rightAfter']}/{n} (mean ROUGE-L F1 {summary['rougeLBefore']:.2f} -> "
            f"{summary['rougeLAfter']:.2f}); {describe_rule()}")

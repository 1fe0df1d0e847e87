"""The one interface every governance check implements, and the context they share.

A check is an object with a `name` and `run(ctx) -> CheckResult`. The context loads
what checks need lazily and once: the base model with the adapter on top (peft; the
base model's behaviour is the same model inside `ctx.base_model_behaviour()`), the
tokenizer, the validated train/eval examples, and a place to write reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from finetune_operator.api.governance import CheckResult, GovernanceSpec
from finetune_operator.api.trainer_config import GovernanceInputs, TrainerConfig

from .. import storage


class Check(Protocol):
    name: str

    def run(self, ctx: "CheckContext") -> CheckResult: ...


def failed(name: str, message: str, **kw: Any) -> CheckResult:
    return CheckResult(name=name, passed=False, message=message, **kw)


@dataclass
class CheckContext:
    config: TrainerConfig
    policy: GovernanceSpec
    inputs: GovernanceInputs
    adapter_uri: str
    adapter_dir: Path
    adapter_digest: str
    workdir: Path
    #: Computed by the provenance check (folder digest of the base model actually loaded).
    base_model_digest: Optional[str] = None
    _cache: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ data

    @property
    def reports_uri(self) -> str:
        return storage.join(self.adapter_uri, "reports")

    def write_report(self, filename: str, content: Any) -> str:
        uri = storage.join(self.reports_uri, filename)
        text = content if isinstance(content, str) else json.dumps(content, indent=2, sort_keys=True)
        storage.write_text(uri, text)
        return uri

    def examples(self, split: str) -> list:
        """Validated examples of `split` ("train" or "eval"), as parsed by the trainer."""
        key = f"examples:{split}"
        if key not in self._cache:
            from ..data import read_examples

            self._cache[key] = read_examples(self.config.data.uri, f"{split}.jsonl", self.config.data.format)
        return self._cache[key]

    @property
    def raw_format(self) -> bool:
        return self.config.data.format == "completion"

    # ------------------------------------------------------------------ model

    @property
    def base_model_dir(self) -> Path:
        if "base_dir" not in self._cache:
            from ..model_io import fetch_model

            # No digest here: a mismatch is the provenance check's finding, not a crash.
            self._cache["base_dir"] = fetch_model(self.config.baseModel.uri, None)
        return self._cache["base_dir"]

    @property
    def processor(self):
        """image-text: the base model's processor (loaded with the model)."""
        if "processor" not in self._cache:
            self.model  # noqa: B018 - loads both
        return self._cache["processor"]

    @property
    def tokenizer(self):
        if "tokenizer" not in self._cache:
            from ..data import ensure_chat_template
            from ..model_io import load_tokenizer

            tok = load_tokenizer(self.base_model_dir)
            ensure_chat_template(tok)
            self._cache["tokenizer"] = tok
        return self._cache["tokenizer"]

    @property
    def device(self):
        from ..model_io import pick_device

        return pick_device()

    @property
    def model(self):
        """The base model with the adapter applied (eval mode, frozen)."""
        if "model" not in self._cache:
            if self.config.data.format == "image-text":  # a vision-language model (governance/vlm.py)
                from .vlm import load_adapted

                self._cache["model"], self._cache["processor"] = load_adapted(
                    self.config, self.base_model_dir, self.adapter_dir, self.device)
            else:
                self._cache["model"] = load_adapted_model(self.config, self.base_model_dir, self.adapter_dir,
                                                          self.device)
        return self._cache["model"]

    def base_model_behaviour(self):
        """Context in which `ctx.model` behaves as the base model (adapter layers bypassed)."""
        return self.model.disable_adapter()


def load_adapted_model(config: TrainerConfig, base_dir: Path, adapter_dir: Path, device):
    """The same loader as training (model_io), then the saved adapter via peft."""
    from peft import PeftModel

    from ..model_io import load_base_model

    # Training precision on a GPU; full precision on CPU where bf16 is slow and inexact.
    precision = config.training.precision if device.type == "cuda" else "fp32"
    base = load_base_model(base_dir, precision=precision, quantization=config.quantization, device=device)
    model = PeftModel.from_pretrained(base, str(peft_folder(adapter_dir)), is_trainable=False)
    model.eval()
    return model


def peft_folder(adapter_dir: Path) -> Path:
    """The folder holding adapter_config.json (the adapter root, or one level below it)."""
    if (adapter_dir / "adapter_config.json").is_file():
        return adapter_dir
    found = sorted(adapter_dir.rglob("adapter_config.json"))
    if not found:
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json in the adapter")
    return found[0].parent


def probe_example(prompt: str, answer: str, raw: bool):
    """A prompt/answer pair in the trainer's example shape (chat template unless raw)."""
    from ..formats import Example

    return Example((("user", prompt), ("assistant", answer)), raw=raw)


def prompt_ids(ctx: CheckContext, prompt: str) -> list[int]:
    """Token ids of a prompt ready for generation (chat template with the assistant turn opened)."""
    tok = ctx.tokenizer
    if ctx.raw_format:
        return tok((tok.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy_continue(ctx: CheckContext, ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of `ids` with the adapted model, decoded without special tokens."""
    import torch

    tok, model = ctx.tokenizer, ctx.model  # load outside no_grad: the weights must stay ordinary tensors
    input_ids = torch.tensor([ids], device=ctx.device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def answer_logprobs(ctx: CheckContext, examples: list, max_len: Optional[int] = None) -> list[float]:
    """Mean per-token log-probability of each example's response tokens (as the trainer masks them)."""
    return [total / tokens for total, tokens in answer_scores(ctx, examples, max_len)]


def answer_scores(ctx: CheckContext, examples: list, max_len: Optional[int] = None) -> list[tuple[float, int]]:
    """(log-probability of the whole response, its token count) of each example: the response
    tokens as the trainer masks them, the end-of-turn token included (so the score is the
    probability of exactly that complete answer).

    Scored in packed batches (objective.example_logprobs): the same numbers as one forward
    pass per example, several times faster. Raises if an answer has no tokens left after truncation.
    """
    from ..data import tokenize_example
    from ..objective import example_logprobs

    model = ctx.model  # load outside no_grad (see greedy_continue)
    limit = max_len or ctx.config.training.maxSeqLength
    tokenized = [tokenize_example(example, ctx.tokenizer, limit) for example in examples]
    pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
    means = example_logprobs(model, tokenized, max_len=max(limit, max(len(t) for t in tokenized)),
                             pad_id=pad_id, device=ctx.device)
    if any(s != s for s in means):  # NaN: nothing to score
        raise ValueError("an answer has no tokens left after truncation")
    # example_logprobs averages over the example's targets; its count is the example's own.
    return [(mean * t.trainable_tokens, t.trainable_tokens) for mean, t in zip(means, tokenized)]

"""The generator (and judge) model: a base model, optionally with a FineTuneJob's adapter, both verified.

The base model is fetched and checked against its declared digest (model_io.fetch_model, as training
does); an adapter is fetched file by file against its manifest, whose digest must be the one the
operator resolved (governance.runner.fetch_adapter, as the governance Job does). Generation is plain
sampling from the raw prompt (no chat template: the template is a document the model continues), in
batches, seeded per batch so the same inputs and seed give the same outputs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from finetune_operator.api.finetunejob import BaseModelRef

from .. import storage
from ..errors import ConfigError
from ..logs import get_logger

log = get_logger("synthesize")

#: Prompts generated together. SmolLM2-135M on one CPU thread: 1.45 s an attempt at 8, 4.55 s at 1, and
#: no gain at 16 (hack/bench/synthesis_bench.py); a batch waits for its longest row.
BATCH_SIZE = 8
#: Longest prompt in tokens (the left end is cut: the instruction to write a new example is at the end).
MAX_PROMPT_TOKENS = 2048
_SCORE = re.compile(r"\b(10|[1-9])(?:\.\d+)?\b")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    device: object
    base_digest: str
    adapter_digest: Optional[str]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def adapter_manifest_digest(uri: str) -> str:
    from ..adapter import MANIFEST

    try:
        return "sha256:" + hashlib.sha256(storage.read_bytes(storage.join(uri, MANIFEST))).hexdigest()
    except FileNotFoundError:
        raise ConfigError(f"inputs.adapterURI {uri}: no {MANIFEST}; not a complete adapter") from None


def load(base: BaseModelRef, adapter_uri: Optional[str], adapter_digest: Optional[str], workdir: Path) -> LoadedModel:
    from ..model_io import fetch_model, load_base_model, load_tokenizer, model_digest, pick_device

    path = fetch_model(base.uri, base.digest)
    digest = model_digest(path)
    device = pick_device()
    precision = "bf16" if device.type == "cuda" else "fp32"
    model = load_base_model(path, precision=precision, device=device)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left, so every row continues its prompt
    if adapter_uri:
        from peft import PeftModel

        from ..governance.base import peft_folder
        from ..governance.runner import AdapterRefused, fetch_adapter

        adapter_digest = adapter_digest or adapter_manifest_digest(adapter_uri)
        try:
            folder = fetch_adapter(adapter_uri, workdir / "adapter", expected_digest=adapter_digest)
        except AdapterRefused as exc:
            raise ConfigError(f"inputs.adapterURI: {exc}") from None
        model = PeftModel.from_pretrained(model, str(peft_folder(folder)), is_trainable=False)
    model.eval()
    model.config.use_cache = True
    return LoadedModel(model, tokenizer, device, digest, adapter_digest if adapter_uri else None)


def generate(loaded: LoadedModel, prompts: list[str], *, temperature: float, top_p: float, max_new_tokens: int,
             seed: int, stop_strings: Optional[list[str]] = None) -> list[str]:
    """The continuation of each prompt (special tokens dropped), sampled under torch.manual_seed(seed)."""
    import torch

    tok = loaded.tokenizer
    batch = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_PROMPT_TOKENS,
                add_special_tokens=False)
    batch = {k: v.to(loaded.device) for k, v in batch.items()}
    torch.manual_seed(seed)
    # generate() runs without autograd (transformers wraps it in no_grad): nothing global is switched off,
    # so a process that trains after generating (the tests) is unaffected.
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    # A blank line ends an example (prompts.parse_output): rows stop there instead of rambling on.
    out = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id, stop_strings=stop_strings, tokenizer=tok,
                                **sampling)
    new = out[:, batch["input_ids"].shape[1]:]
    return tok.batch_decode(new, skip_special_tokens=True)


def judge_prompt(rubric: str, instruction: str, response: str) -> str:
    return (f"{rubric.strip()}\n\nInstruction: {instruction}\nResponse: {response}\n\n"
            "Rate the example from 1 to 10. Score:")


def parse_score(text: str) -> Optional[float]:
    """The first score from 1 to 10 in the judge's answer, or None."""
    found = _SCORE.search(text)
    return float(found.group(1)) if found else None


class ModelJudge:
    """A judge that asks a model (greedy, a few tokens) for a score of each candidate."""

    def __init__(self, loaded: LoadedModel, rubric: str):
        self.loaded, self.rubric = loaded, rubric

    def __call__(self, instruction: str, response: str) -> Optional[float]:
        answer = generate(self.loaded, [judge_prompt(self.rubric, instruction, response)], temperature=0, top_p=1,
                          max_new_tokens=4, seed=0)[0]
        return parse_score(answer)

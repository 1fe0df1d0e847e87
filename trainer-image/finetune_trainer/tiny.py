"""Tiny Hugging Face-format models built from a config, for tests, `ftctl run --tiny` and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a built-in
corpus, and the weights are random. The result is saved exactly like a hub model
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat
template), so the real loading code path is what runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

#: ChatML, the template most instruction-tuned open models use (Qwen, SmolLM2, ...).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_CORPUS = """
The quick brown fox jumps over the lazy dog. A model learns from examples.
Question: What is the capital of France? Answer: Paris is the capital of France.
Translate to French: good morning -> bonjour. Summarize the text in one sentence.
user assistant system instruction input output prompt completion response
The nurse, the engineer, the doctor and the teacher went to work on Monday.
He she they man woman person people old young Christian Muslim Jewish Hindu Buddhist
Contact me at someone@example.com or call 555-123-4567. 0123456789
Kubernetes operator fine-tuning dataset adapter governance promotion evaluation.
"""


def train_tokenizer(out_dir: Path, vocab_size: int = 512, extra_text: Iterable[str] = ()) -> None:
    """Train a byte-level BPE tokenizer offline and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS, *extra_text] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token=None,
        unk_token=None, model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)


def build_tiny_model(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
    architecture: str = "llama",
    extra_text: Iterable[str] = (),
) -> Path:
    """Save a random Llama- (or Qwen2-) shaped causal LM plus tokenizer to out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out_dir, vocab_size=vocab_size, extra_text=extra_text)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    config_cls = Qwen2Config if architecture == "qwen2" else LlamaConfig
    config = config_cls(
        vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Build a tiny random model in Hugging Face format")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ns = ap.parse_args(argv)
    build_tiny_model(ns.out_dir, hidden_size=ns.hidden_size, layers=ns.layers)
    print(ns.out_dir)


if __name__ == "__main__":
    main()

"""A tiny LLaVA-shaped vision-language model built from a config, for tests and `ftctl run --tiny`.

A CLIP vision tower (32x32 pixels, 8x8 patches: 16 image tokens), a two-layer MLP projector and a
tiny Llama language model, random weights; the processor is LlavaProcessor with a PIL CLIP image
processor and the offline BPE tokenizer of tiny.py plus an `<image>` token. Saved like a hub model
(config.json, model.safetensors, processor and tokenizer files, a chat template that renders image
parts), so AutoModelForImageTextToText / AutoProcessor load it through the real code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

IMAGE_TOKEN = "<image>"

#: ChatML whose content may be a list of parts; an image part renders as the image token.
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_vlm(out_dir: Path, *, image_size: int = 32, patch_size: int = 8, hidden_size: int = 64,
                   layers: int = 2, vision_hidden: int = 32, seed: int = 0, extra_text: Iterable[str] = ()) -> Path:
    import torch
    from transformers import (AutoModelForImageTextToText, AutoTokenizer, CLIPVisionConfig, LlamaConfig,
                              LlavaConfig, LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .tiny import train_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out_dir, vocab_size=512, extra_text=extra_text)
    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHATML_IMAGE_TEMPLATE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHATML_IMAGE_TEMPLATE, image_token=IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                       num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                                       patch_size=patch_size, projection_dim=vision_hidden),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden_size,
                                max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_select_strategy="default",
        vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir

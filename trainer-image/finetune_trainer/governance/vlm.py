"""Governance of a vision-language adapter (Dataset format image-text): what the checks need that
the text path does not have.

- the model: the base loaded as training loads it (vision.load_base: AutoModelForImageTextToText,
  safetensors only) with the adapter on top (peft, modules_to_save included);
- held-out losses per example, with the adapter and with it bypassed, through the same processor
  collation and assistant-only labels as training (the evaluation check's paired bootstrap takes them);
- exact match on a labelled set whose rows may carry an image: {"prompt", "answer", "image"?} with
  the image an s3:// / file:// URI or a path relative to the set's folder (images.py checks it).

Text-only probes (bias, PII memorization) need nothing here: they run on the language path, the same
model given no image.
"""

from __future__ import annotations

from .. import images, storage, vision
from ..formats import Example, Part
from .base import CheckContext


def is_vlm(config) -> bool:
    return config.data.format == "image-text"


def load_adapted(config, base_dir, adapter_dir, device):
    """(adapted model in eval mode, processor)."""
    from peft import PeftModel

    from .base import peft_folder

    precision = config.training.precision if device.type == "cuda" else "fp32"
    base, processor = vision.load_base(base_dir, precision=precision, device=device)
    model = PeftModel.from_pretrained(base, str(peft_folder(adapter_dir)), is_trainable=False)
    model.eval()
    return model, processor


def eval_split(ctx: CheckContext, limit: int) -> "vision.Examples":
    key = f"vlm-eval:{limit}"
    if key not in ctx._cache:
        ctx._cache[key] = vision.Examples(ctx.examples("eval")[:limit], ctx.processor, ctx.config.data.uri,
                                          ctx.config.training.maxSeqLength)
    return ctx._cache[key]


def example_losses(ctx: CheckContext, limit: int) -> tuple[list[float], list[float], list[int]]:
    """Per held-out example: summed loss with the base model, with the adapter, and its token count."""
    import torch

    split = eval_split(ctx, limit)
    if not len(split):
        raise ValueError("no evaluation example has an assistant token within maxSeqLength")
    model, pad_id = ctx.model, ctx.processor.tokenizer.pad_token_id
    encoded = [split.get(i) for i in split.usable]

    def losses() -> list[float]:
        with torch.no_grad():
            return [float(vision.loss_sum(model, vision.collate([e], pad_id), ctx.device)) for e in encoded]

    adapter = losses()
    with ctx.base_model_behaviour():
        base = losses()
    return base, adapter, [e.n_targets for e in encoded]


def answer_scores(ctx: CheckContext, items: list[tuple[str, str, str, str | None]]) -> list[tuple[float, int]]:
    """(log-probability of the whole answer, its token count) of (prompt, answer, image URI, folder) items:
    the image before the prompt, the answer as an assistant message (labels as in training)."""
    import torch

    model, pad_id, out = ctx.model, ctx.processor.tokenizer.pad_token_id, []
    for prompt, answer, image, folder in items:
        try:
            uri = image if "://" in image else images.resolve(image, folder)
        except images.ImageProblem as exc:
            raise ValueError(f"probe image {image[:200]!r}: {exc}") from None
        parts = (Part("image", uri), Part("text", prompt))
        example = Example((("user", prompt), ("assistant", answer)), parts=(parts, None))
        encoded = vision.encode(example, ctx.processor, folder or "", 1 << 20)
        if encoded is None:
            raise ValueError(f"probe answer {answer[:60]!r} has no token to score")
        with torch.no_grad():
            loss = float(vision.loss_sum(model, vision.collate([encoded], pad_id), ctx.device))
        out.append((-loss, encoded.n_targets))
    return out


def generate(ctx: CheckContext, prompt: str, image_uri: str | None, folder: str | None, max_new_tokens: int) -> str:
    """Greedy answer of the adapted model to a prompt (and an image), decoded without special tokens."""
    import torch

    model, processor = ctx.model, ctx.processor
    parts = ((Part("image", image_uri),) if image_uri else ()) + (Part("text", prompt),)
    example = Example((("user", prompt),), parts=(parts,))
    msgs = vision.chat_messages(example)
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    pictures = None
    if image_uri:
        absolute = image_uri if "://" in image_uri else images.resolve(image_uri, folder)
        data = images.read_image_bytes(absolute, folder if "://" not in image_uri else None)
        pictures = [images.to_rgb(images.inspect(data, absolute)[0])]
    batch = processor(text=[text], images=pictures, return_tensors="pt")
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    tok = processor.tokenizer
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def set_folder(uri: str) -> str:
    """The folder of a labelled set's file (relative image paths start there)."""
    loc = storage.parse(uri)
    head = loc.key.rsplit("/", 1)[0] if "/" in loc.key else ""
    if loc.scheme == "file":
        return "file://" + (head or "/")
    return f"s3://{loc.bucket}/{head}" if head else f"s3://{loc.bucket}"

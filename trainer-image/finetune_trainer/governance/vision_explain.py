"""explainability for a vision-language adapter: which image patches (and prompt words) its answers rest on.

For each of the first `samples` held-out examples with an image, the score is the log-probability of
the reference answer, F = sum_t log p(y_t | image, prompt, y_<t), from the adapted model.

Pictures -- integrated gradients over the pixels (Captum's IntegratedGradients on pixel_values, as
the processor made them), summed over channels and over each vision patch (the encoder's
patch_size): the patch's share of the total |attribution| is its heat. The baseline is the same
image flattened to its median colour (per channel): its dominant colour without any content, so what
is attributed is what stands out -- a defect, a label, a shape -- and a plain background gets none.
(Two other baselines were tried on the planted case of tests/governance/test_vlm.py: all-zero
pixel_values, the processor's mean colour, starts the path where a small encoder's normalization is
steepest, and 64 Riemann steps missed the integral by over 90%; a blurred copy spreads a halo of
attribution around every edge, over a third of it outside the planted region.)
Why integrated gradients and not attention rollout: IG attributes the answer's probability itself,
through the encoder, the projector and the language model together, and its completeness
(sum of attributions = F(image) - F(baseline), reported as `convergenceDelta`) makes the numbers
checkable; rollout only follows the encoder's attention, says nothing about what the language model
used, and needs attention weights that fused (sdpa / flash) kernels do not return.

Words -- the text path's integrated gradients over the prompt's token embeddings (explainability.py),
with the image held fixed: the protected-attribute share, compared with maxProtectedAttributeShare,
as for text adapters.

Reports beside the adapter: reports/explainability.json (per sample: the patch grid of shares, the
hottest patch, the tokens and their attributions, the PNG's name), reports/explain-<n>.png (the
image as the model saw it, enlarged, with the heat as a red overlay and the hottest patch framed)
and reports/explainability.html, which shows the PNGs (linked by relative name) and the tokens.
"""

from __future__ import annotations

import html
import io

from finetune_operator.api.governance import CheckResult

from .. import pii, storage, vision
from .base import CheckContext, failed
from .bias import load_probes, protected_terms
from .explainability import content_mask, protected_share, redact_pieces

N_STEPS = 32
#: Side of the overlay PNGs in pixels (the model's input is often 32-336 px: enlarged to be seen).
OVERLAY_SIDE = 256


def patch_size(model) -> int:
    config = model.config
    vision_config = getattr(config, "vision_config", None)
    return int(getattr(vision_config, "patch_size", 0) or getattr(config, "patch_size", 0) or 14)


def patch_grid(pixel_attr, patch: int) -> list[list[float]]:
    """|attribution| summed per patch, as shares of the total (rows top to bottom)."""
    heat = pixel_attr.abs().sum(0)  # (H, W)
    h, w = heat.shape
    rows, cols = max(1, h // patch), max(1, w // patch)
    grid = heat[:rows * patch, :cols * patch].reshape(rows, patch, cols, patch).sum((1, 3))
    total = float(grid.sum()) or 1.0
    return (grid / total).tolist()


def flattened(pixels):
    """The baseline: the image flattened to its median colour (per channel) everywhere."""
    median = pixels.flatten(2).median(dim=-1).values  # (batch, channels)
    return median[..., None, None].expand_as(pixels).clone()


def attribute_image(ctx: CheckContext, encoded: "vision.Encoded") -> dict:
    import torch
    from captum.attr import IntegratedGradients

    model = ctx.model
    inputs = {k: v.to(ctx.device) for k, v in encoded.inputs.items()}
    labels = encoded.labels[0].to(ctx.device)
    positions = (labels[1:] != vision.IGNORE).nonzero().flatten()  # logits at t predict token t + 1
    targets = labels[1:][positions]
    others = {k: v for k, v in inputs.items() if k not in ("pixel_values", "input_ids", "attention_mask")}

    def score(pixel_values):
        n = len(pixel_values)
        logits = model(input_ids=inputs["input_ids"].expand(n, -1), attention_mask=inputs["attention_mask"].expand(n, -1),
                       pixel_values=pixel_values, **others).logits[:, positions].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs.gather(-1, targets.expand(n, -1)[..., None]).squeeze(-1).sum(-1)

    pixels = inputs["pixel_values"].float()
    attributions, delta = IntegratedGradients(score).attribute(
        pixels, baselines=flattened(pixels), n_steps=N_STEPS, internal_batch_size=N_STEPS,
        return_convergence_delta=True)
    grid = patch_grid(attributions[0].detach().cpu(), patch_size(model))
    # captum's delta = sum(attributions) - (F(image) - F(baseline)): relative to the difference it explains
    total, error = float(attributions.sum()), float(delta.abs().max())
    flat = [(share, r, c) for r, row in enumerate(grid) for c, share in enumerate(row)]
    top = max(flat)
    return {"patchGrid": grid, "hottestPatch": {"row": top[1], "col": top[2], "share": top[0]},
            "convergenceDelta": error, "scoreDifference": total - float(delta.max()),
            "pixels": pixels[0].detach().cpu()}


def attribute_words(ctx: CheckContext, encoded: "vision.Encoded", example) -> dict:
    """Integrated gradients over the prompt's token embeddings, the image held fixed."""
    import torch
    from captum.attr import LayerIntegratedGradients

    model, tok = ctx.model, ctx.processor.tokenizer
    inputs = {k: v.to(ctx.device) for k, v in encoded.inputs.items()}
    ids = inputs["input_ids"]
    labels = encoded.labels[0].to(ctx.device)
    positions = (labels[1:] != vision.IGNORE).nonzero().flatten()
    targets = labels[1:][positions]
    prompt_len = int(positions[0]) + 1
    pieces = [tok.decode([t]) for t in ids[0, :prompt_len].tolist()]
    in_content = content_mask(pieces, [c for role, c in example.messages if role != "assistant"])
    image_token = getattr(ctx.processor, "image_token_id", None)
    baseline = ids.clone()
    for i, replace in enumerate(in_content):
        if replace and int(ids[0, i]) != image_token:
            baseline[0, i] = tok.pad_token_id
    others = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}

    def score(input_ids):
        n = len(input_ids)
        extra = {k: v.expand(n, *v.shape[1:]) if k == "pixel_values" else v for k, v in others.items()}
        logits = model(input_ids=input_ids, attention_mask=inputs["attention_mask"].expand(n, -1),
                       **extra).logits[:, positions].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs.gather(-1, targets.expand(n, -1)[..., None]).squeeze(-1).sum(-1)

    lig = LayerIntegratedGradients(score, model.get_input_embeddings())
    attributions = lig.attribute(inputs=ids, baselines=baseline, n_steps=N_STEPS, internal_batch_size=N_STEPS)
    per_token = attributions.sum(-1)[0, :prompt_len].detach().float().cpu().tolist()
    shown = ["[image]" if int(t) == image_token else p for t, p in zip(ids[0, :prompt_len].tolist(), pieces)]
    return {"tokens": redact_pieces(shown), "attributions": [0.0 if p == "[image]" else a
                                                             for p, a in zip(shown, per_token)],
            "response": pii.redact(tok.decode(ids[0, prompt_len:], skip_special_tokens=True))}


def overlay_png(pixels, processor, grid: list[list[float]], hottest: dict) -> bytes:
    """The image as the model saw it (de-normalized), enlarged, the heat in red, the hottest patch framed."""
    import numpy as np
    from PIL import Image, ImageDraw

    ip = getattr(processor, "image_processor", None)
    mean = np.asarray(getattr(ip, "image_mean", None) or [0.5, 0.5, 0.5], dtype=np.float32)[:, None, None]
    std = np.asarray(getattr(ip, "image_std", None) or [0.5, 0.5, 0.5], dtype=np.float32)[:, None, None]
    rgb = np.clip((pixels.numpy() * std + mean) * 255, 0, 255).astype("uint8").transpose(1, 2, 0)
    picture = Image.fromarray(rgb).convert("RGB").resize((OVERLAY_SIDE, OVERLAY_SIDE), Image.Resampling.NEAREST)
    heat = np.asarray(grid, dtype=np.float32)
    alpha = (heat / (heat.max() or 1.0) * 160).astype("uint8")
    mask = Image.fromarray(alpha).resize((OVERLAY_SIDE, OVERLAY_SIDE), Image.Resampling.NEAREST)
    red = Image.new("RGB", picture.size, (255, 0, 0))
    out = Image.composite(red, picture, mask)
    rows, cols = heat.shape
    ph, pw = OVERLAY_SIDE / rows, OVERLAY_SIDE / cols
    r, c = hottest["row"], hottest["col"]
    ImageDraw.Draw(out).rectangle([c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1], outline=(255, 255, 0), width=2)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def render_html(samples: list[dict], threshold: float) -> str:
    rows = []
    for n, s in enumerate(samples, start=1):
        peak = max((abs(a) for a in s["attributions"]), default=0.0) or 1.0
        spans = []
        for piece, a, protected in zip(s["tokens"], s["attributions"], s["protected"]):
            color = f"rgba(220,40,40,{min(1.0, abs(a) / peak):.2f})" if a >= 0 else \
                f"rgba(40,80,220,{min(1.0, abs(a) / peak):.2f})"
            style = f"background:{color}" + (";text-decoration:underline" if protected else "")
            spans.append(f'<span title="{a:.4g}" style="{style}">{html.escape(piece)}</span>')
        hot = s["hottestPatch"]
        rows.append(f"<h2>Sample {n}</h2><img src=\"{html.escape(s['image'])}\" width=\"{OVERLAY_SIDE}\" "
                    f"alt=\"attribution heatmap of sample {n}\"><p>Hottest patch: row {hot['row']}, column "
                    f"{hot['col']} ({hot['share']:.0%} of the attribution); protected share of the words "
                    f"{s['protectedShare']:.2%}</p><pre>{''.join(spans)}</pre>"
                    f"<p>Response: {html.escape(s['response'])}</p>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Image and token attributions</title></head>"
            "<body><h1>Integrated-gradients attributions of the answer to image patches and prompt tokens</h1>"
            "<p>Red: share of the answer's attribution per vision patch (baseline: the image flattened to its median colour); the yellow "
            f"frame is the hottest patch. Underlined tokens are protected attributes (max share {threshold:.0%})."
            f"</p>{''.join(rows)}</body></html>")


def run_check(ctx: CheckContext, name: str = "explainability") -> CheckResult:
    from .vlm import eval_split

    t = ctx.policy.explainability
    terms = protected_terms(load_probes(ctx.policy.bias.probesURI))
    split = eval_split(ctx, 512)
    samples = []
    for index in split.usable:
        example = split.examples[index]
        if not example.images():
            continue
        encoded = split.get(index)
        picture = attribute_image(ctx, encoded)
        words = attribute_words(ctx, encoded, example)
        n = len(samples) + 1
        png = f"explain-{n}.png"
        storage.write_bytes(storage.join(ctx.reports_uri, png),
                            overlay_png(picture.pop("pixels"), ctx.processor, picture["patchGrid"],
                                        picture["hottestPatch"]))
        share, mask = protected_share(words, terms)
        samples.append({**picture, **words, "image": png, "imageURI": storage.join(ctx.reports_uri, png),
                        "protected": mask, "protectedShare": share})
        if len(samples) >= t.samples:
            break
    if not samples:
        return failed(name, "no evaluation example with an image to explain")
    value = max(s["protectedShare"] for s in samples)
    uri = ctx.write_report("explainability.json", {
        "method": "integrated gradients (Captum) over pixel_values per vision patch, median-colour baseline; "
                  "over prompt token embeddings, pad baseline", "steps": N_STEPS,
        "maxProtectedAttributeShare": t.maxProtectedAttributeShare, "samples": samples})
    ctx.write_report("explainability.html", render_html(samples, t.maxProtectedAttributeShare))
    summary = (f"attribution heatmaps for {len(samples)} images (reports/explain-N.png); largest "
               f"protected-attribute share of the words {value:.2%} (max {t.maxProtectedAttributeShare:.0%})")
    if value > t.maxProtectedAttributeShare:
        return failed(name, summary, value=value, threshold=t.maxProtectedAttributeShare, reportURI=uri)
    return CheckResult(name=name, passed=True, value=value, threshold=t.maxProtectedAttributeShare,
                       message=summary, reportURI=uri)

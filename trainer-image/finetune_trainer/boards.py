"""Synthetic circuit-board photos for image-text tests and examples/multimodal/ (Pillow, no downloads).

A green board with copper traces and pads; a defective board also has a dark burn mark in one
quadrant. The answer names the defect and where it is, so only that region carries the answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUESTION = "Inspect this circuit board. Is there a defect, and where?"


def draw_board(rng: random.Random, size: int, defect: str | None):
    """One board picture (RGB); `defect` is a quadrant name or None."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (20, 100 + rng.randint(-15, 15), 40))
    draw = ImageDraw.Draw(img)
    for _ in range(4):  # traces and pads, anywhere: they carry no answer
        y = rng.randint(0, size - 1)
        draw.line([(0, y), (size - 1, y)], fill=(190, 150, 60), width=1)
        x, yy = rng.randint(2, size - 3), rng.randint(2, size - 3)
        draw.rectangle([x - 1, yy - 1, x + 1, yy + 1], fill=(210, 200, 170))
    if defect is not None:
        half = size // 2
        col, row = ("right" in defect), ("bottom" in defect)
        cx = col * half + rng.randint(half // 4, 3 * half // 4)
        cy = row * half + rng.randint(half // 4, 3 * half // 4)
        r = max(2, size // 8)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(15, 10, 10))
    return img


def answer(defect: str | None) -> str:
    return "No defect: the board is fine." if defect is None else f"Defect: a burn mark at the {defect}."


def write_boards(folder: Path, n: int, *, size: int = 32, seed: int = 0, defect_share: float = 0.6) -> Path:
    """`n` boards as PNGs under folder/boards/ and folder/data.jsonl (image-text lines with relative
    image paths and metadata.defect); returns the JSONL path."""
    rng = random.Random(seed)
    folder = Path(folder)
    (folder / "boards").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        defect = rng.choice(QUADRANTS) if rng.random() < defect_share else None
        name = f"boards/board-{i:05d}.png"
        draw_board(rng, size, defect).save(folder / name)
        lines.append(json.dumps({
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": answer(defect)}],
            "metadata": {"defect": defect or "none"}}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path

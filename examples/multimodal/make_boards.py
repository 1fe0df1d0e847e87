"""Write the example's synthetic board-inspection data: examples/multimodal/data/ (PNGs + data.jsonl).

    python examples/multimodal/make_boards.py            # what is committed: 100 boards, 32x32 pixels
    python examples/multimodal/make_boards.py --n 2000 --size 336 --out /tmp/boards   # a real run's size

Pillow draws each board (green, copper traces, pads); 60% get a burn mark in one quadrant, and the
answer names it ("Defect: a burn mark at the top left."). finetune_trainer/boards.py has the drawing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune_trainer.boards import write_boards

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "data")
    ns = ap.parse_args()
    print(write_boards(ns.out, ns.n, size=ns.size, seed=ns.seed))


if __name__ == "__main__":
    main()

"""Render the model card's picture: a grid of prompts -> images (held-out captions marked *).

    python -m training.make_grid [--model models/shapes] [--out models/shapes/grid.png]

Renders through the farm's own loader/renderer at the model's defaults (seed = column index).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from evaluation import checks as S  # noqa: E402

CELL, TEXT = 128, 30


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=S.DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    train, held = S.split()
    chosen = [(c, True) for c in held[::2]] + [(c, False) for c in train[::12]]
    model = S.load(args.model)
    images = S.render(model, [S.caption(*c) for c, _ in chosen], [i for i in range(len(chosen))])
    cols = 8
    rows = (len(chosen) + cols - 1) // cols
    grid = Image.new("RGB", (cols * CELL, rows * (CELL + TEXT)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, ((combo, is_held), im) in enumerate(zip(chosen, images)):
        x, y = (i % cols) * CELL, (i // cols) * (CELL + TEXT)
        grid.paste(im.resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        a = S.analyse(im)
        ok = (a.colour, a.shape, a.background) == combo
        c, s, b = combo
        draw.text((x + 3, y + CELL + 2), f"{'*' if is_held else ''}{c} {s}", fill=(0, 0, 0))
        draw.text((x + 3, y + CELL + 15), f"on {b} {'ok' if ok else 'x'}", fill=(0, 110, 0) if ok else (200, 0, 0))
    out = args.out or Path(args.model) / "grid.png"
    grid.save(out)
    print(out)


if __name__ == "__main__":
    main()

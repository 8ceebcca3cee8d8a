"""A contact sheet: a grid of images with their prompt and seed underneath, as one PNG."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

CELL = 192
CAPTION = 40


def contact_sheet(items: Sequence[tuple[Path, str]], out: Path, *, columns: int = 4) -> Path:
    """Write a grid of ``(image path, caption)`` to ``out``; each image scaled to fit a cell."""
    if not items:
        raise ValueError("a contact sheet needs at least one image")
    rows = -(-len(items) // columns)
    sheet = Image.new("RGB", (columns * CELL, rows * (CELL + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for n, (path, caption) in enumerate(items):
        x, y = (n % columns) * CELL, (n // columns) * (CELL + CAPTION)
        with Image.open(path) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((CELL, CELL), Image.Resampling.NEAREST if image.width < CELL else Image.Resampling.LANCZOS)
            if thumb.width < CELL and thumb.height < CELL:
                scale = min(CELL // thumb.width, CELL // thumb.height)
                thumb = thumb.resize((thumb.width * scale, thumb.height * scale), Image.Resampling.NEAREST)
            sheet.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        lines = textwrap.wrap(caption, width=30)[:3]
        draw.multiline_text((x + 4, y + CELL + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out

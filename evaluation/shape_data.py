"""The shapes model's world: the vocabulary and the ground-truth drawings it was trained on.

* the vocabulary: :data:`COLOURS` (named sRGB colours, far apart), :data:`SHAPES`, :data:`WORDS`
  (every word a caption uses), :func:`caption` and :func:`parse_caption`;
* the held-out split :func:`split` of :func:`all_combos` (colour, shape, background triples);
* ground truth: :class:`Scene`, :func:`random_scene`, :func:`draw` (anti-aliased RGB image) and
  :func:`shape_mask` (the ideal shape filling a box, what the analysis matches against);
* :func:`write_imagefolder`: a small captioned dataset of drawings (``metadata.jsonl`` + PNGs), as
  ``farm train lora --data`` takes it.

Deterministic from a seed; numpy and PIL only. Re-exported by ``evaluation.checks``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Named colours (sRGB). Far apart in RGB so the nearest named colour is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Every word a caption uses (the tokenizer gets exactly these as whole-word tokens).
WORDS: tuple[str, ...] = ("a", "on", "shape", "background", *COLOURS, *SHAPES)

IMAGE_SIZE = 64
#: Shape side as a fraction of the image side (40-80 % of the image, so shapes stay readable).
MIN_FRAC, MAX_FRAC = 0.45, 0.78
#: Pixels of background kept around the shape (the border is what the background is read from).
MARGIN = 4
SUPERSAMPLE = 4

#: Held-out (colour, shape, background) triples: never drawn for training, used for evaluation.
HELD_OUT_COUNT = 32
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: float  # side in pixels (at IMAGE_SIZE)
    cx: float
    cy: float

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)


def all_combos() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def split(seed: int = SPLIT_SEED, count: int = HELD_OUT_COUNT) -> tuple[list, list]:
    """``(train, held_out)`` lists of (colour, shape, background) triples, deterministic.

    Held-out triples are picked so that every pair inside them (colour+shape, colour+background,
    shape+background) still occurs in training: the test is composition, not unseen words.
    """
    combos = all_combos()
    rng = random.Random(seed)
    order = combos[:]
    rng.shuffle(order)
    held: list[tuple[str, str, str]] = []
    per_colour: dict[str, int] = {}
    per_shape: dict[str, int] = {}
    for combo in order:
        c, s, b = combo
        # spread the held-out set evenly over colours and shapes
        if per_colour.get(c, 0) >= count // len(COLOURS) or per_shape.get(s, 0) >= count // len(SHAPES):
            continue
        trial = set(held) | {combo}
        rest = [x for x in combos if x not in trial]
        pairs = (
            {(x[0], x[1], "cs") for x in rest}
            | {(x[0], x[2], "cb") for x in rest}
            | {(x[1], x[2], "sb") for x in rest}
        )
        if (c, s, "cs") in pairs and (c, b, "cb") in pairs and (s, b, "sb") in pairs:
            held.append(combo)
            per_colour[c] = per_colour.get(c, 0) + 1
            per_shape[s] = per_shape.get(s, 0) + 1
        if len(held) == count:
            break
    held_set = set(held)
    return [x for x in combos if x not in held_set], sorted(held)


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    words = text.strip().lower().split()
    if len(words) == 7 and words[0] == "a" and words[3:5] == ["on", "a"] and words[6] == "background":
        c, s, b = words[1], words[2], words[5]
        if c in COLOURS and s in SHAPES and b in COLOURS:
            return c, s, b
    return None


def random_scene(rng: random.Random, combo: tuple[str, str, str]) -> Scene:
    size = rng.uniform(MIN_FRAC, MAX_FRAC) * IMAGE_SIZE
    lo, hi = MARGIN + size / 2, IMAGE_SIZE - MARGIN - size / 2
    return Scene(*combo, size=size, cx=rng.uniform(lo, hi), cy=rng.uniform(lo, hi))


def _polygon(shape: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]] | None:
    w, h = x1 - x0, y1 - y0
    if shape == "triangle":
        return [(x0 + w / 2, y0), (x1, y1), (x0, y1)]
    if shape == "cross":
        a, b = 1 / 3, 2 / 3
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
        return [(x0 + u * w, y0 + v * h) for u, v in pts]
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_polygon(shape, *box), fill=fill)


def draw(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` anti-aliased (drawn at 4x and downsampled) as an RGB image."""
    k = SUPERSAMPLE * size / IMAGE_SIZE
    big = Image.new("RGB", (size * SUPERSAMPLE,) * 2, COLOURS[scene.background])
    half = scene.size / 2
    box = ((scene.cx - half) * k, (scene.cy - half) * k, (scene.cx + half) * k - 1, (scene.cy + half) * k - 1)
    _draw_shape(ImageDraw.Draw(big), scene.shape, box, COLOURS[scene.colour])
    return big.resize((size, size), Image.Resampling.BOX)


def shape_mask(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Boolean mask (h, w) of the ideal ``shape`` filling ``box`` = (x0, y0, x1, y1) inclusive."""
    img = Image.new("L", size, 0)
    _draw_shape(ImageDraw.Draw(img), shape, box, 255)
    return np.asarray(img) > 127


def write_imagefolder(root, n: int = 8, *, seed: int = 0, caption_column: str = "text"):
    """An imagefolder of ``n`` drawings of random (colour, shape, background) triples with their
    captions: ``<root>/<i>.png`` and ``<root>/metadata.jsonl`` (``file_name``, ``caption_column``)."""
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng, combos, rows = random.Random(seed), all_combos(), []
    for i in range(n):
        combo = combos[rng.randrange(len(combos))]
        draw(random_scene(rng, combo)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", caption_column: caption(*combo)})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root

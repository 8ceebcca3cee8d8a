"""Plain image analysis (no learned judge): what a shapes image shows, and how images compare.

* :func:`analyse` (an :class:`Analysis`): background colour (median of the border), foreground
  colour (median of the pixels far from the background, :func:`foreground_mask`, as the
  :func:`nearest_colour`) and shape class (best overlap of the foreground with ideal
  circle/square/triangle/cross masks fitted to its bounding box);
* against captions: :func:`scores` (colour/background/shape accuracy) and :func:`adherence` (their
  mean), :func:`colour_share` and :func:`colour_fidelity` (pixels near the named colours);
* :func:`mean_abs_diff` between two images, optionally inside a mask.

numpy and PIL at import time, scipy inside the functions. Re-exported by ``evaluation.checks``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from evaluation.shape_data import COLOURS, SHAPES, shape_mask

_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
#: A pixel farther than this (RGB distance) from the background colour counts as foreground.
FG_DISTANCE = 80.0


def nearest_colour(rgb: Sequence[float]) -> str:
    d = np.linalg.norm(_RGB - np.asarray(rgb, dtype=np.float32)[None], axis=1)
    return _NAMES[int(np.argmin(d))]


@dataclass
class Analysis:
    background: str
    colour: str | None
    shape: str | None
    #: Fraction of the image that is foreground.
    fg_fraction: float
    #: Best template overlap (intersection over union) for the chosen shape.
    shape_iou: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)


def foreground_mask(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, background_rgb)``: pixels far from the median border colour, largest blob only."""
    from scipy import ndimage

    a = _as_array(image)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    mask = np.linalg.norm(a - bg[None, None], axis=2) > FG_DISTANCE
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask, bg


def analyse(image: Image.Image | np.ndarray) -> Analysis:
    """Read background colour, foreground colour and shape class off an image."""
    from scipy import ndimage

    a = _as_array(image)
    mask, bg = foreground_mask(a)
    background = nearest_colour(bg)
    h, w = mask.shape
    fraction = float(mask.mean())
    if mask.sum() < 0.02 * h * w:
        return Analysis(background=background, colour=None, shape=None, fg_fraction=fraction)
    core = ndimage.binary_erosion(mask, iterations=1)
    pixels = a[core] if core.sum() >= 8 else a[mask]
    colour = nearest_colour(np.median(pixels, axis=0))
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    best, best_iou = None, -1.0
    for shape in SHAPES:
        ideal = shape_mask(shape, box, (w, h))
        iou = float((ideal & mask).sum() / max(1, (ideal | mask).sum()))
        if iou > best_iou:
            best, best_iou = shape, iou
    return Analysis(background=background, colour=colour, shape=best, fg_fraction=fraction, shape_iou=best_iou)


def colour_share(image: Image.Image | np.ndarray, colour: str, *, tolerance: float = 90.0) -> float:
    """Fraction of pixels within ``tolerance`` (RGB distance) of the named ``colour``."""
    a = _as_array(image)
    return float((np.linalg.norm(a - np.array(COLOURS[colour], np.float32), axis=2) < tolerance).mean())


def scores(expected: Iterable[tuple[str, str, str]], analyses: Iterable[Analysis]) -> dict[str, float]:
    ok_c = ok_b = ok_s = n = 0
    for (c, s, b), got in zip(expected, analyses, strict=True):
        n += 1
        ok_c += got.colour == c
        ok_b += got.background == b
        ok_s += got.shape == s
    n = max(n, 1)
    return {"colour_accuracy": ok_c / n, "background_accuracy": ok_b / n, "shape_accuracy": ok_s / n}


def adherence(combos: Sequence[tuple[str, str, str]], images: Sequence[Image.Image]) -> float:
    """Mean of colour, background and shape accuracy: how well images follow their captions."""
    s = scores(combos, [analyse(im) for im in images])
    return (s["colour_accuracy"] + s["background_accuracy"] + s["shape_accuracy"]) / 3


def colour_fidelity(combos: Sequence[tuple[str, str, str]], images: Sequence[Image.Image], *, tolerance: float = 40.0) -> float:
    """Mean fraction of pixels within ``tolerance`` (RGB distance) of the caption's two colours."""
    return float(np.mean([colour_share(im, c, tolerance=tolerance) + colour_share(im, b, tolerance=tolerance) for im, (c, _, b) in zip(images, combos)]))


def mean_abs_diff(a: Image.Image, b: Image.Image, mask: np.ndarray | None = None) -> float:
    """Mean absolute pixel difference (0..255) over ``mask`` (all pixels if None)."""
    d = np.abs(_as_array(a) - _as_array(b)).mean(axis=2)
    return float(d[mask].mean() if mask is not None else d.mean())

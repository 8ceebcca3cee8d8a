"""Semantic checks for the shapes model: does an image show what its prompt asked for?

Everything here measures meaning with plain image analysis (no learned judge). This module holds
rendering through the farm's own path and the checks, and re-exports the rest so that
``evaluation.checks`` stays the one module to import:

* the procedural world the shapes model was trained on (:data:`COLOURS`, :data:`SHAPES`,
  :func:`draw`, :func:`caption`, the held-out split :func:`split`), deterministic from a seed, lives
  in ``evaluation.shape_data``;
* :func:`analyse`: background colour (median of the border), foreground colour (median of the
  pixels far from the background, nearest named colour) and shape class (best overlap of the
  foreground with ideal circle/square/triangle/cross masks fitted to its bounding box), with the
  other image measures, lives in ``evaluation.image_analysis``;
* :func:`evaluate`: render the held-out captions with the farm's own loader and renderer and report
  colour/background/shape accuracy;
* reusable checks (guidance, negative prompt, img2img, inpainting, LoRA), each a function that
  returns numbers and a ``passed`` flag, used by ``tests/semantic``.

Every image here is rendered the way a worker renders it: an ``ImageSpec`` per image (built by
:func:`image_spec` at the model's ``farm.json`` defaults) and a ``Conditioning`` with its init image
and mask, through ``workers.diffusion.render.render_batch`` (:func:`render_specs`; :func:`render`,
:func:`img2img` and :func:`inpaint` are shorthands for it), LoRAs activated with the worker's
``workers.lora.adapters.AdapterSet``. There is no second pipeline here: a check tests the farm.

numpy and PIL only at import time; scipy, torch, diffusers and ``workers`` are imported inside the
functions that need them, so this module stays cheap to import.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from farm.settings import shipped_model

if TYPE_CHECKING:
    from farm.catalogue import ModelDefaults

# re-exported, so that every public name stays importable from evaluation.checks
from evaluation.image_analysis import (  # noqa: F401
    FG_DISTANCE, Analysis, _as_array, adherence, analyse, colour_fidelity, colour_share, foreground_mask,
    mean_abs_diff, nearest_colour, scores,
)
from evaluation.shape_data import (  # noqa: F401
    COLOURS, HELD_OUT_COUNT, IMAGE_SIZE, MARGIN, MAX_FRAC, MIN_FRAC, SHAPES, SPLIT_SEED, SUPERSAMPLE, WORDS, Scene,
    all_combos, caption, draw, parse_caption, random_scene, shape_mask, split,
)

# -- rendering through the farm's own path ---------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where the shipped model lives in a checkout.
DEFAULT_MODEL = shipped_model("shapes")


def model_defaults(path: Path | str = DEFAULT_MODEL) -> "ModelDefaults":
    """How the model at ``path`` renders by default, as the farm decides it (``farm.catalogue``:
    its ``farm.json``, then the settings)."""
    from farm.catalogue import Catalogue
    from farm.settings import Settings

    settings = Settings(models={"evaluated": str(path)}, default_model="evaluated")
    return Catalogue(settings).defaults("evaluated")


_LOADED: dict[str, Any] = {}


def load(path: Path | str = DEFAULT_MODEL, *, device: str = "cpu"):
    """The model loaded with ``workers.diffusion.pipeline.load_pipeline`` (cached per path and device)."""
    key = f"{Path(path).resolve()}@{device}"
    if key not in _LOADED:
        import torch

        from workers.diffusion.pipeline import load_pipeline

        if device == "cpu":
            torch.set_num_threads(min(torch.get_num_threads(), 2) or 1)
        _LOADED[key] = load_pipeline("shapes", str(path), models_dir=Path(path).parent, device=device)
    return _LOADED[key]


def image_spec(
    model,
    prompt: str,
    seed: int,
    *,
    negative_prompt: str = "",
    guidance_scale: float | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    **fields: Any,
):
    """The ``farm.request.spec.ImageSpec`` a worker would get for ``prompt`` at the model's defaults.

    ``None`` means the model's ``farm.json`` value; ``fields`` sets any other ``ImageSpec`` field
    (``mode``, ``strength``, ``mask_blur``, ``paste_back``, ``loras``, ...).
    """
    from farm.request.spec import ImageSpec

    d = model_defaults(model.path)
    return ImageSpec(
        prompt=prompt, negative_prompt=negative_prompt, seed=int(seed),
        steps=d.steps if steps is None else steps,
        guidance_scale=float(d.guidance_scale if guidance_scale is None else guidance_scale),
        width=d.width, height=d.height, scheduler=scheduler or d.scheduler, model=model.name, **fields,
    )


def render_specs(model, specs: Sequence[Any], conditions: Sequence[Any] | None = None, *, batch_size: int = 16) -> list[Image.Image]:
    """Render ``specs`` (with their ``workers.diffusion.render.Conditioning``) exactly as a worker does:
    ``render_batch`` with the model's scheduler config, at most ``batch_size`` images a call, each
    call one batch key (as the farm batches them). Images come back in the order of ``specs``."""
    from workers.diffusion.render import Conditioning, render_batch

    conditions = list(conditions) if conditions is not None else [Conditioning() for _ in specs]
    if len(conditions) != len(specs):
        raise ValueError(f"{len(specs)} specs but {len(conditions)} conditions")
    groups: dict[tuple, list[int]] = {}
    for n, spec in enumerate(specs):
        groups.setdefault(spec.batch_key, []).append(n)
    images: dict[int, Image.Image] = {}
    for members in groups.values():
        for i in range(0, len(members), batch_size):
            chunk = members[i : i + batch_size]
            result = render_batch(
                model, [specs[n] for n in chunk], base_scheduler_config=model.scheduler_config,
                conditions=[conditions[n] for n in chunk],
            )
            images.update(zip(chunk, (r.image for r in result.images)))
    return [images[n] for n in range(len(specs))]


def render(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float | None = None,
    steps: int | None = None,
    negative_prompts: Sequence[str] | None = None,
    batch_size: int = 16,
    loras: tuple = (),
) -> list[Image.Image]:
    """txt2img with ``workers.diffusion.render.render_batch`` exactly as a farm worker would.

    ``loras`` (``((sha256, weight), ...)``) only goes into the specs, as in a worker's: the adapters
    themselves are activated beforehand (``workers.lora.adapters.AdapterSet``, see :func:`check_lora`).
    """
    negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    specs = [
        image_spec(model, p, s, negative_prompt=neg, guidance_scale=guidance_scale, steps=steps, loras=tuple(loras))
        for p, s, neg in zip(prompts, seeds, negatives, strict=True)
    ]
    return render_specs(model, specs, batch_size=batch_size)


def held_out_prompts(n: int) -> list[tuple[tuple[str, str, str], str, int]]:
    """``n`` (combo, caption, seed) for the evaluation: held-out triples in turn, seeds 0, 1, ..."""
    _, held = split()
    out = []
    for i in range(n):
        combo = held[i % len(held)]
        out.append((combo, caption(*combo), 1000 + i))
    return out


def evaluate(
    path: Path | str = DEFAULT_MODEL,
    *,
    images: int = 64,
    guidance_scale: float | None = None,
    steps: int | None = None,
    device: str = "cpu",
    save_dir: Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Render ``images`` held-out captions at the model's defaults; colour/background/shape accuracy."""
    import time

    if threads:
        import torch

        torch.set_num_threads(threads)

    model = load(path, device=device)
    d = model_defaults(model.path)
    items = held_out_prompts(images)
    started = time.perf_counter()
    rendered = render(model, [p for _, p, _ in items], [s for _, _, s in items], guidance_scale=guidance_scale, steps=steps)
    seconds = time.perf_counter() - started
    analyses = [analyse(im) for im in rendered]
    result: dict[str, Any] = scores([c for c, _, _ in items], analyses)
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        for i, (im, (combo, _, seed)) in enumerate(zip(rendered, items)):
            im.save(save_dir / f"{i:03d}_{'_'.join(combo)}_{seed}.png")
    result.update(
        images=len(items),
        held_out_combos=len(split()[1]),
        guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
        steps=d.steps if steps is None else steps,
        scheduler=d.scheduler,
        width=d.width,
        height=d.height,
        seconds=round(seconds, 2),
        model=str(model.path),
    )
    return result


# -- semantic checks the farm reuses ---------------------------------------------------------------------
#
# Each check takes a model loaded with ``workers.diffusion.pipeline.load_pipeline`` (``LoadedModel``), renders a
# few images and returns a :class:`CheckResult`: the numbers it measured and whether they pass.


@dataclass
class CheckResult:
    name: str
    passed: bool
    values: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.name}: {'PASS' if self.passed else 'FAIL'} {json.dumps(self.values)}"


def check_set(n: int, *, offset: int = 0) -> list[tuple[tuple[str, str, str], str, int]]:
    """``n`` held-out (combo, caption, seed) spread over the held-out set, seeds after ``offset``."""
    _, held = split()
    step = max(1, len(held) // n)
    return [(held[(i * step) % len(held)], caption(*held[(i * step) % len(held)]), 5000 + offset + i) for i in range(n)]


def check_guidance(model, *, n: int = 8, low: float = 1.0, margin: float = 0.04, steps: int | None = None) -> CheckResult:
    """Adherence at guidance ``low`` (1.0: no classifier-free guidance) is clearly below the default's.

    Adherence is measured two ways on the same prompts and seeds: the analyser's accuracy (mean of
    colour, background and shape right) and colour fidelity (share of pixels that have the caption's
    colours, within 40 RGB). The model follows its captions well even unguided, so what guidance buys
    is mostly exact colours: fidelity must be at least ``margin`` higher at the default, and accuracy
    must not be lower.
    """
    items = check_set(n)
    combos, prompts, seeds = zip(*items)
    default = model_defaults(model.path).guidance_scale
    hi_images = render(model, prompts, seeds, steps=steps)
    lo_images = render(model, prompts, seeds, guidance_scale=low, steps=steps)
    acc_hi, acc_lo = adherence(combos, hi_images), adherence(combos, lo_images)
    fid_hi, fid_lo = colour_fidelity(combos, hi_images), colour_fidelity(combos, lo_images)
    return CheckResult(
        "guidance",
        fid_hi - fid_lo >= margin and acc_hi >= acc_lo,
        {
            "default_guidance": default, "low_guidance": low,
            "colour_fidelity_default": round(fid_hi, 3), "colour_fidelity_low": round(fid_lo, 3), "min_gap": margin,
            "accuracy_default": round(acc_hi, 3), "accuracy_low": round(acc_lo, 3),
        },
    )


def check_negative_prompt(model, *, n: int = 8, max_ratio: float = 0.9, min_lower: float = 0.75, steps: int | None = None) -> CheckResult:
    """Naming the foreground colour in the negative prompt ("a red shape") lowers that colour's share.

    Same prompts and seeds with and without the negative prompt; the share of pixels within 40 RGB of
    the foreground colour must drop to at most ``max_ratio`` of its value on average, and be lower in
    at least ``min_lower`` of the images.
    """
    items = check_set(n, offset=100)
    combos, prompts, seeds = zip(*items)
    base = render(model, prompts, seeds, steps=steps)
    neg = render(model, prompts, seeds, negative_prompts=[f"a {c} shape" for c, _, _ in combos], steps=steps)
    without = [colour_share(im, c, tolerance=40) for im, (c, _, _) in zip(base, combos)]
    with_neg = [colour_share(im, c, tolerance=40) for im, (c, _, _) in zip(neg, combos)]
    share_base, share_neg = float(np.mean(without)), float(np.mean(with_neg))
    lower = float(np.mean([w < b for w, b in zip(with_neg, without)]))
    return CheckResult(
        "negative_prompt",
        share_neg <= max_ratio * share_base and lower >= min_lower,
        {"fg_share_without": round(share_base, 4), "fg_share_with_negative": round(share_neg, 4), "max_ratio": max_ratio,
         "images_lower": lower, "negative_prompt": "a <colour> shape"},
    )


def img2img(
    model, image: Image.Image, prompt: str, *, strength: float, seed: int,
    guidance_scale: float | None = None, steps: int | None = None, negative_prompt: str = "",
) -> Image.Image:
    """img2img through the farm's render path (``render_batch``, mode ``img2img``) at the model's defaults."""
    from workers.diffusion.render import Conditioning

    spec = image_spec(
        model, prompt, seed, negative_prompt=negative_prompt, guidance_scale=guidance_scale, steps=steps,
        mode="img2img", strength=float(strength),
    )
    return render_specs(model, [spec], [Conditioning(init=image)])[0]


def check_img2img(model, *, n: int = 4, close: float = 12.0, follow: float = 0.75, steps: int | None = None) -> CheckResult:
    """Strength 0.2 keeps the input (mean abs diff < ``close``); 0.9 follows a new prompt."""
    _, held = split()
    rng = random.Random(7)
    diffs, follows = [], []
    for i in range(n):
        src = held[(i * 5) % len(held)]
        dst = held[(i * 5 + 11) % len(held)]
        image = draw(random_scene(rng, src))
        low = img2img(model, image, caption(*src), strength=0.2, seed=i, steps=steps)
        high = img2img(model, image, caption(*dst), strength=0.9, seed=i, steps=steps)
        diffs.append(mean_abs_diff(image, low))
        follows.append(adherence([dst], [high]))
    d, f = float(np.mean(diffs)), float(np.mean(follows))
    return CheckResult("img2img", d < close and f >= follow, {"mean_abs_diff_at_0.2": round(d, 2), "max_diff": close, "adherence_at_0.9": round(f, 3), "min_adherence": follow})


def inpaint(
    model, image: Image.Image, mask: np.ndarray | Image.Image, prompt: str, *, seed: int,
    guidance_scale: float | None = None, steps: int | None = None, negative_prompt: str = "",
    scheduler: str | None = None, strength: float = 1.0, mask_blur: int = 0, paste_back: bool = False,
) -> Image.Image:
    """Inpainting through the farm's render path (``render_batch``, mode ``inpaint``).

    ``mask`` is boolean (h, w), True where to repaint, or a farm mask image (white = repaint). With
    the defaults (strength 1, no blur, nothing pasted back) what is kept outside the mask is what the
    model and VAE reconstruct there, so a check measures the model, not a paste. A 4-channel model
    (like the shapes model) is inpainted by diffusers' latent blending, a 9-channel one by its
    inpainting UNet: whatever ``render_batch`` does for a worker.
    """
    from workers.diffusion.render import Conditioning

    if not isinstance(mask, Image.Image):
        mask = Image.fromarray(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8), "L")
    spec = image_spec(
        model, prompt, seed, negative_prompt=negative_prompt, guidance_scale=guidance_scale, steps=steps,
        scheduler=scheduler, mode="inpaint", strength=float(strength), mask_blur=int(mask_blur),
        paste_back=bool(paste_back),
    )
    return render_specs(model, [spec], [Conditioning(init=image, mask=mask)])[0]


def check_inpainting(model, *, n: int = 4, outside_tol: float = 10.0, inside_share: float = 0.5, steps: int | None = None) -> CheckResult:
    """Outside the mask the input is kept (mean abs diff < ``outside_tol``); inside, the prompt's colour appears.

    Input: a plain background of a named colour. Mask: a centred square. Prompt: a shape of another
    colour on that background; the inside of the mask must then be mostly that colour.
    """
    from scipy import ndimage

    names = list(COLOURS)
    outside, inside = [], []
    h = w = IMAGE_SIZE
    mask = np.zeros((h, w), bool)
    mask[16:48, 16:48] = True
    far_outside = ~ndimage.binary_dilation(mask, iterations=4)
    core = np.zeros_like(mask)
    core[24:40, 24:40] = True
    for i in range(n):
        bg = names[(3 * i + 1) % len(names)]
        fg = names[(5 * i + 2) % len(names)]
        if fg == bg:
            fg = names[(names.index(fg) + 1) % len(names)]
        image = Image.new("RGB", (w, h), COLOURS[bg])
        out = inpaint(model, image, mask, caption(fg, "square", bg), seed=i, steps=steps)
        outside.append(mean_abs_diff(image, out, far_outside))
        inside.append(colour_share(np.asarray(out)[core].reshape(16, 16, 3), fg))
    o, s = float(np.mean(outside)), float(np.mean(inside))
    return CheckResult("inpainting", o < outside_tol and s >= inside_share, {"outside_mean_abs_diff": round(o, 2), "max_outside_diff": outside_tol, "inside_prompt_colour_share": round(s, 3), "min_inside_share": inside_share})


LORA_NAME = "green"


def lora_path(model_path: Path | str = DEFAULT_MODEL, name: str = LORA_NAME) -> Path:
    return Path(model_path) / "loras" / f"{name}.safetensors"


def check_lora(model, *, n: int = 8, path: Path | str | None = None, colour: str = LORA_NAME, min_effect: float = 0.6, steps: int | None = None) -> CheckResult:
    """With the LoRA active shapes come out ``colour``; at weight 0 the base output is back (±2 levels).

    The LoRA goes in as a worker's does: ``workers.lora.adapters.AdapterSet.activate`` with the
    file's sha256 and the job's weight, the specs carrying ``loras=((sha256, weight),)``. Afterwards
    the adapter is deleted and the LoRA layers removed, so ``model`` renders as loaded again.
    """
    import hashlib

    from workers.lora.adapters import AdapterSet

    path = Path(path) if path is not None else lora_path(model.path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    _, held = split()
    combos = [c for c in held if c[0] != colour and c[2] != colour][:n]
    prompts = [caption(*c) for c in combos]
    seeds = [7000 + i for i in range(len(combos))]
    base = render(model, prompts, seeds, steps=steps)
    adapters = AdapterSet(model.pipe, max_loaded=1)
    try:
        adapters.activate([(sha, path, 1.0)])
        on = render(model, prompts, seeds, steps=steps, loras=((sha, 1.0),))
        adapters.activate([(sha, path, 0.0)])
        off = render(model, prompts, seeds, steps=steps, loras=((sha, 0.0),))
    finally:
        adapters.clear()
        model.pipe.unload_lora_weights()
    is_colour = lambda ims: float(np.mean([analyse(im).colour == colour for im in ims]))  # noqa: E731
    zero_diff = max(float(np.abs(_as_array(a) - _as_array(b)).max()) for a, b in zip(base, off))
    on_rate, base_rate, off_rate = is_colour(on), is_colour(base), is_colour(off)
    return CheckResult(
        "lora",
        on_rate >= min_effect and on_rate - base_rate >= min_effect - 0.1 and zero_diff <= 2 and off_rate == base_rate,
        {f"{colour}_rate_base": base_rate, f"{colour}_rate_lora": on_rate, f"{colour}_rate_weight0": off_rate, "weight0_max_pixel_diff": zero_diff, "lora": str(path)},
    )

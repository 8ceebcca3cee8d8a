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

numpy, PIL and scipy only at import time; torch/diffusers are imported inside the functions that
render, so this module stays cheap to import.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from farm.settings import shipped_model

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


def model_defaults(path: Path | str = DEFAULT_MODEL) -> dict[str, Any]:
    """The model's ``farm.json`` (default guidance, steps, size, scheduler), with fallbacks."""
    defaults = {"default_guidance_scale": 5.0, "default_steps": 20, "width": 64, "height": 64, "scheduler": "dpmpp_2m"}
    f = Path(path) / "farm.json"
    if f.is_file():
        defaults.update(json.loads(f.read_text()))
    return defaults


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


def render(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float | None = None,
    steps: int | None = None,
    negative_prompts: Sequence[str] | None = None,
    batch_size: int = 16,
) -> list[Image.Image]:
    """Render with ``workers.diffusion.render.render_batch`` exactly as a farm worker would."""
    from farm.request.spec import ImageSpec
    from workers.diffusion.render import render_batch

    d = model_defaults(model.path)
    g = d["default_guidance_scale"] if guidance_scale is None else guidance_scale
    n_steps = d["default_steps"] if steps is None else steps
    negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    specs = [
        ImageSpec(
            prompt=p, negative_prompt=neg, seed=int(s), steps=n_steps, guidance_scale=float(g),
            width=d["width"], height=d["height"], scheduler=d["scheduler"], model=model.name,
        )
        for p, s, neg in zip(prompts, seeds, negatives, strict=True)
    ]
    images: list[Image.Image] = []
    for i in range(0, len(specs), batch_size):
        result = render_batch(model, specs[i : i + batch_size], base_scheduler_config=dict(model.scheduler_config))
        images += [r.image for r in result.images]
    return images


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
        guidance_scale=d["default_guidance_scale"] if guidance_scale is None else guidance_scale,
        steps=d["default_steps"] if steps is None else steps,
        scheduler=d["scheduler"],
        width=d["width"],
        height=d["height"],
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
    default = model_defaults(model.path)["default_guidance_scale"]
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


def _img2img_pipe(model):
    from diffusers import StableDiffusionImg2ImgPipeline

    components = {k: v for k, v in model.pipe.components.items()}
    components["requires_safety_checker"] = False
    pipe = StableDiffusionImg2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img(model, image: Image.Image, prompt: str, *, strength: float, seed: int, guidance_scale: float | None = None, steps: int | None = None) -> Image.Image:
    """diffusers' img2img with the model's modules (shared, no copy) and the farm's default scheduler."""
    import torch

    from workers.diffusion.schedulers import make_scheduler

    d = model_defaults(model.path)
    pipe = _img2img_pipe(model)
    pipe.scheduler = make_scheduler(d["scheduler"], dict(model.scheduler_config))
    with torch.inference_mode():
        return pipe(
            prompt=prompt, image=image, strength=strength,
            num_inference_steps=d["default_steps"] if steps is None else steps,
            guidance_scale=d["default_guidance_scale"] if guidance_scale is None else guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]


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
    model, image: Image.Image, mask: np.ndarray, prompt: str, *, seed: int,
    guidance_scale: float | None = None, steps: int | None = None, negative_prompt: str = "",
    scheduler: str | None = None,
) -> Image.Image:
    """Inpaint with a 4-channel model by latent blending (diffusers' inpaint pipeline needs 9 channels).

    ``mask`` is boolean (h, w), True where to repaint. After each sampler step (the farm's scheduler
    ``scheduler``, default the model's), the latent outside the
    (latent-resolution) mask is replaced by the input's latent noised to that step, so only the
    inside is generated while it sees a consistent outside. No pixels are pasted back: what is kept
    outside is what the VAE reconstructs.
    """
    import torch

    from workers.diffusion.schedulers import make_scheduler

    pipe = model.pipe
    d = model_defaults(model.path)
    g = d["default_guidance_scale"] if guidance_scale is None else guidance_scale
    n_steps = d["default_steps"] if steps is None else steps
    sched = make_scheduler(scheduler or d["scheduler"], dict(model.scheduler_config))
    sched.set_timesteps(n_steps)
    gen = torch.Generator("cpu").manual_seed(seed)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    with torch.inference_mode():
        x = torch.from_numpy(_as_array(image)).permute(2, 0, 1)[None].div(127.5).sub(1).to(device, dtype)
        x0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        m = torch.nn.functional.interpolate(m, size=x0.shape[-2:], mode="area").gt(0.01).to(device, dtype)
        noise = torch.randn(x0.shape, generator=gen).to(device, dtype)
        cond, uncond = pipe.encode_prompt(prompt, device, 1, True, negative_prompt)
        embeds = torch.cat([uncond, cond])
        latents = noise * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            e_u, e_c = pipe.unet(inp, t, encoder_hidden_states=embeds).sample.chunk(2)
            latents = sched.step(e_u + g * (e_c - e_u), t, latents).prev_sample
            if i + 1 < len(sched.timesteps):
                known = sched.add_noise(x0, noise, sched.timesteps[i + 1 : i + 2])
            else:
                known = x0
            latents = m * latents + (1 - m) * known
        out = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    arr = ((out[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


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
    """With the LoRA loaded shapes come out ``colour``; at weight 0 the base output is back (±2 levels)."""
    path = Path(path) if path is not None else lora_path(model.path)
    _, held = split()
    combos = [c for c in held if c[0] != colour and c[2] != colour][:n]
    prompts = [caption(*c) for c in combos]
    seeds = [7000 + i for i in range(len(combos))]
    base = render(model, prompts, seeds, steps=steps)
    pipe = model.pipe
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="semantic_check")
    try:
        pipe.set_adapters(["semantic_check"], [1.0])
        on = render(model, prompts, seeds, steps=steps)
        pipe.set_adapters(["semantic_check"], [0.0])
        off = render(model, prompts, seeds, steps=steps)
    finally:
        pipe.unload_lora_weights()
    is_colour = lambda ims: float(np.mean([analyse(im).colour == colour for im in ims]))  # noqa: E731
    zero_diff = max(float(np.abs(_as_array(a) - _as_array(b)).max()) for a, b in zip(base, off))
    on_rate, base_rate, off_rate = is_colour(on), is_colour(base), is_colour(off)
    return CheckResult(
        "lora",
        on_rate >= min_effect and on_rate - base_rate >= min_effect - 0.1 and zero_diff <= 2 and off_rate == base_rate,
        {f"{colour}_rate_base": base_rate, f"{colour}_rate_lora": on_rate, f"{colour}_rate_weight0": off_rate, "weight0_max_pixel_diff": zero_diff, "lora": str(path)},
    )

"""Render one GPU batch: images that share model, mode, size, steps, scheduler, guidance and strength.

Each image keeps its own seed: the pipeline gets one CPU ``torch.Generator`` per image, so an image
comes out the same alone or inside any batch, on any GPU (CPU generators are device-independent).
img2img and inpainting reuse the loaded modules (``pipe.components``): no second copy of the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image, ImageFilter

from farm.errors import RenderError
from farm.imaging.inputs import fit
from farm.request.spec import ImageSpec
from workers.diffusion.pipeline import LoadedModel
from workers.diffusion.schedulers import make_scheduler

#: ``on_step(done, total)``; return False to stop the batch early (its images were canceled).
StepCallback = Callable[[int, int], bool]


@dataclass
class Conditioning:
    """An image's inputs, fetched by the worker: the init image and, for inpainting, the mask."""

    init: Image.Image | None = None
    mask: Image.Image | None = None


@dataclass
class Rendered:
    image: Image.Image
    prompt_tokens: int
    prompt_truncated: bool


@dataclass
class BatchResult:
    images: list[Rendered]
    seconds: float
    interrupted: bool
    #: seconds by phase: text_encode, denoise, vae_decode (for workers.metrics)
    phases: dict[str, float] = field(default_factory=dict)


def check_inputs(model: LoadedModel, specs: Sequence[ImageSpec], conditions: Sequence[Conditioning]) -> None:
    """Refuse a batch this pipeline cannot render, before any GPU work."""
    if not specs:
        raise RenderError("empty batch")
    keys = {spec.batch_key for spec in specs}
    if len(keys) != 1:
        raise RenderError(f"a batch must share model, mode, size, steps, scheduler, guidance and strength; got {sorted(keys)}")
    spec = specs[0]
    in_channels = model.pipe.unet.config.in_channels
    if in_channels == 9 and spec.mode != "inpaint":
        raise RenderError(
            f"model {model.name!r} has a 9-channel inpainting UNet: it renders inpainting jobs only ({spec.mode} asked)"
        )
    if in_channels not in (4, 9):
        raise RenderError(f"model {model.name!r} has a {in_channels}-channel UNet: not an SD1.x model")
    factor = model.pipe.vae_scale_factor
    if spec.width % factor or spec.height % factor:
        raise RenderError(f"size {spec.width}x{spec.height} is not a multiple of the VAE factor {factor}")
    if spec.mode != "txt2img" and any(c.init is None for c in conditions):
        raise RenderError(f"{spec.mode} needs an init image for every image of the batch")
    if spec.mode == "inpaint" and any(c.mask is None for c in conditions):
        raise RenderError("inpainting needs a mask for every image of the batch")


def count_tokens(model: LoadedModel, prompt: str, embeddings=None) -> tuple[int, bool]:
    """Content tokens in ``prompt`` and whether plain CLIP encoding would cut it (the farm does not:
    long prompts are encoded in 75-token chunks, see ``workers.diffusion.prompts``)."""
    from workers.diffusion.prompts import token_count

    count = token_count(model.pipe, prompt, embeddings)
    return count, count > model.pipe.tokenizer.model_max_length - 2


def render_batch(
    model: LoadedModel,
    specs: Sequence[ImageSpec],
    *,
    base_scheduler_config: dict,
    conditions: Sequence[Conditioning] | None = None,
    on_step: StepCallback | None = None,
) -> BatchResult:
    conditions = list(conditions) if conditions is not None else [Conditioning() for _ in specs]
    # 1. check inputs before any GPU work
    check_inputs(model, specs, conditions)
    spec = specs[0]
    pipe = model.pipe
    # textual-inversion embeddings the batch's prompts use (the batch key holds the set)
    embeddings = _embeddings(model, spec.embeddings)

    # Texts padded to different numbers of 77-token windows would change each other's images:
    # render each window count as its own batch, so an image is the same alone or in any batch.
    from workers.diffusion.prompts import window_count

    groups: dict[int, list[int]] = {}
    for n, s in enumerate(specs):
        groups.setdefault(window_count(pipe, s.prompt, s.negative_prompt, embeddings), []).append(n)
    if len(groups) > 1:
        return _render_groups(model, specs, conditions, list(groups.values()), base_scheduler_config, on_step)

    # 2. the scheduler this batch asked for, from the model's own config (2-3 ms, no reload)
    pipe.scheduler = make_scheduler(spec.scheduler, base_scheduler_config)

    # 3. the text: plain prompts go through diffusers as they are; long, weighted or clip-skipped
    #    ones become embeddings (A1111-style chunks and weights)
    from workers.diffusion.prompts import encode_prompts

    encode_started = time.perf_counter()
    tokens = [count_tokens(model, s.prompt, embeddings) for s in specs]
    embeds = encode_prompts(
        pipe, [s.prompt for s in specs], [s.negative_prompt for s in specs], clip_skip=spec.clip_skip, device=pipe.device,
        embeddings=embeddings, cache=getattr(model, "prompt_cache", None),
    )
    from workers.diffusion.tokenizer import clean_text

    text = (
        {"prompt": [clean_text(s.prompt) for s in specs], "negative_prompt": [clean_text(s.negative_prompt or "") for s in specs]}
        if embeds is None
        else {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}
    )

    text_seconds = time.perf_counter() - encode_started

    # 4. one generator per image; the inputs at the batch's size
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]
    inits = [fit(c.init.convert("RGB"), spec.width, spec.height, spec.resize_mode) for c in conditions if c.init]
    masks = [fit(c.mask.convert("L"), spec.width, spec.height, spec.resize_mode, fill=255) for c in conditions if c.mask]
    if masks and spec.mask_blur:
        masks = [m.filter(ImageFilter.GaussianBlur(spec.mask_blur)) for m in masks]  # as diffusers' mask_processor.blur

    # 5. denoise, reporting each step; a False from on_step interrupts the loop
    interrupted = False
    denoised_at = None

    def step_end(pipeline, step: int, timestep, callback_kwargs):
        nonlocal interrupted, denoised_at
        denoised_at = time.perf_counter()  # after the last step: the VAE decode follows
        if on_step is not None and not on_step(step + 1, pipeline.num_timesteps):
            interrupted = True
            pipeline._interrupt = True
        return callback_kwargs

    common = dict(
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        generator=generators,
        callback_on_step_end=step_end,
        output_type="pil",
        **text,
    )
    started = time.perf_counter()
    with torch.inference_mode():
        if spec.mode == "txt2img":
            images = pipe(width=spec.width, height=spec.height, **common).images
        elif int(spec.steps * spec.strength) < 1:
            images = _round_trip(model, inits)  # strength 0: no denoising step; the VAE's own reconstruction
        elif spec.mode == "img2img":
            images = _variant(model, "img2img")(image=inits, strength=spec.strength, **common).images
        else:
            images = _variant(model, "inpaint")(
                image=inits, mask_image=masks, strength=spec.strength, width=spec.width, height=spec.height, **common
            ).images
    if spec.mode == "inpaint" and spec.paste_back:
        images = [paste_back(out, init, mask) for out, init, mask in zip(images, inits, masks)]
    finished = time.perf_counter()
    seconds = finished - started
    rendered = [
        Rendered(image=image, prompt_tokens=count, prompt_truncated=truncated)
        for image, (count, truncated) in zip(images, tokens)
    ]
    denoised_at = denoised_at or started
    phases = {"text_encode": text_seconds, "denoise": denoised_at - started, "vae_decode": finished - denoised_at}
    return BatchResult(images=rendered, seconds=seconds, interrupted=interrupted, phases=phases)


def _embeddings(model: LoadedModel, wanted):
    """The batch's embeddings loaded into the text encoder (``model.embeddings``, a
    :class:`workers.diffusion.embeddings.EmbeddingStore` the worker attaches), or None."""
    if not wanted:
        return None
    store = getattr(model, "embeddings", None)
    if store is None:
        raise RenderError(f"the batch uses embeddings {[name for name, _ in wanted]} but this worker has no embedding store")
    return store.activate(wanted)


def _render_groups(model, specs, conditions, groups, base_scheduler_config, on_step) -> BatchResult:
    results: dict[int, Rendered] = {}
    seconds, interrupted = 0.0, False
    phases: dict[str, float] = {}
    for members in groups:
        part = render_batch(
            model, [specs[n] for n in members], base_scheduler_config=base_scheduler_config,
            conditions=[conditions[n] for n in members], on_step=on_step,
        )
        results.update(zip(members, part.images))
        seconds += part.seconds
        for name, value in part.phases.items():
            phases[name] = phases.get(name, 0.0) + value
        interrupted = interrupted or part.interrupted
        if interrupted:
            break
    if interrupted:
        return BatchResult(images=[], seconds=seconds, interrupted=True, phases=phases)
    return BatchResult(images=[results[n] for n in range(len(specs))], seconds=seconds, interrupted=False, phases=phases)


def paste_back(output: Image.Image, init: Image.Image, mask: Image.Image) -> Image.Image:
    """Keep the init image's pixels where the mask is black, exactly; blend by the mask elsewhere."""
    return Image.composite(output.convert("RGB"), init.convert("RGB"), mask.convert("L"))


def _variant(model: LoadedModel, kind: str):
    """The img2img or inpainting pipeline over the loaded modules (built once per model)."""
    cache = model.__dict__.setdefault("_variants", {})
    if kind not in cache:
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

        cls = StableDiffusionImg2ImgPipeline if kind == "img2img" else StableDiffusionInpaintPipeline
        variant = cls(**model.pipe.components, requires_safety_checker=False)
        variant.set_progress_bar_config(disable=True)
        cache[kind] = variant
    variant = cache[kind]
    variant.scheduler = model.pipe.scheduler
    return variant


def _round_trip(model: LoadedModel, inits: list[Image.Image]) -> list[Image.Image]:
    """Encode and decode through the VAE: what strength 0 means (no noise, no step)."""
    pipe = model.pipe
    with torch.inference_mode():
        pixels = pipe.image_processor.preprocess(inits).to(device=pipe.device, dtype=pipe.vae.dtype)
        latents = pipe.vae.encode(pixels).latent_dist.mode()
        decoded = pipe.vae.decode(latents).sample
        return pipe.image_processor.postprocess(decoded, output_type="pil")


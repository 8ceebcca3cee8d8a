"""Render one GPU batch: images that share model, size, steps, scheduler and guidance.

Each image keeps its own seed: the pipeline gets one CPU ``torch.Generator`` per image, so an image
comes out the same alone or inside any batch, on any GPU (CPU generators are device-independent).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image

from farm.errors import RenderError
from farm.spec import ImageSpec
from workers.pipeline import LoadedModel
from workers.schedulers import make_scheduler

#: ``on_step(done, total)``; return False to stop the batch early (its images were canceled).
StepCallback = Callable[[int, int], bool]


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


def check_inputs(model: LoadedModel, specs: Sequence[ImageSpec]) -> None:
    """Refuse a batch this pipeline cannot render, before any GPU work."""
    if not specs:
        raise RenderError("empty batch")
    keys = {spec.batch_key for spec in specs}
    if len(keys) != 1:
        raise RenderError(f"a batch must share model, size, steps, scheduler and guidance; got {sorted(keys)}")
    in_channels = model.pipe.unet.config.in_channels
    if in_channels != 4:
        raise RenderError(
            f"model {model.name!r} has a {in_channels}-channel UNet (an inpainting model?): "
            "txt2img needs a 4-channel UNet"
        )
    factor = model.pipe.vae_scale_factor
    spec = specs[0]
    if spec.width % factor or spec.height % factor:
        raise RenderError(f"size {spec.width}x{spec.height} is not a multiple of the VAE factor {factor}")


def count_tokens(model: LoadedModel, prompt: str) -> tuple[int, bool]:
    """Tokens in ``prompt`` (without the start/end tokens) and whether the text encoder will cut it."""
    tokenizer = model.pipe.tokenizer
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    return len(ids) - 2, len(ids) > tokenizer.model_max_length


def render_batch(
    model: LoadedModel,
    specs: Sequence[ImageSpec],
    *,
    base_scheduler_config: dict,
    on_step: StepCallback | None = None,
) -> BatchResult:
    # 1. check inputs before any GPU work
    check_inputs(model, specs)
    spec = specs[0]
    pipe = model.pipe

    # 2. the scheduler this batch asked for, from the model's own config (2-3 ms, no reload)
    pipe.scheduler = make_scheduler(spec.scheduler, base_scheduler_config)

    # 3. what the text encoder will see
    tokens = [count_tokens(model, s.prompt) for s in specs]

    # 4. one generator per image
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]

    # 5. denoise, reporting each step; a False from on_step interrupts the loop
    interrupted = False

    def step_end(pipeline, step: int, timestep, callback_kwargs):
        nonlocal interrupted
        if on_step is not None and not on_step(step + 1, pipeline.num_timesteps):
            interrupted = True
            pipeline._interrupt = True
        return callback_kwargs

    started = time.perf_counter()
    with torch.inference_mode():
        output = pipe(
            prompt=[s.prompt for s in specs],
            negative_prompt=[s.negative_prompt for s in specs],
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            width=spec.width,
            height=spec.height,
            generator=generators,
            callback_on_step_end=step_end,
            output_type="pil",
        )
    seconds = time.perf_counter() - started
    rendered = [
        Rendered(image=image, prompt_tokens=count, prompt_truncated=truncated)
        for image, (count, truncated) in zip(output.images, tokens)
    ]
    return BatchResult(images=rendered, seconds=seconds, interrupted=interrupted)

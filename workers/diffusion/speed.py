"""Make a loaded SD1.x pipeline render faster: memory layout, fused projections, VAE slicing, compile.

:func:`optimize` applies the knobs to a pipeline in place and returns what it applied (for logs and
the benchmark's JSON); :func:`warmup` renders each bucketed shape once so that ``torch.compile``
compiles at worker start, not inside the first task, and :func:`freeze_compiled_shapes` then runs
any other shape eagerly instead of stopping the worker for minutes to compile it (the buckets are the
warm-up sizes × batches 1…``FARM_MAX_BATCH_SIZE``). :func:`defaults` is what a device gets when a
knob is left as ``None``.

What each knob does and why its default is what it is:

* ``channels_last`` (UNet + VAE): NHWC convolutions, the layout cuDNN's fp16 tensor-core kernels
  want. Exact on CPU up to float rounding (pixels within 1/255). On by default on CUDA.
* ``fuse_qkv``: ``pipe.fuse_qkv_projections()`` (diffusers, experimental): one matmul for q/k/v of
  self-attention and one for k/v of cross-attention. Same function up to float rounding. On by
  default on CUDA. **Not with LoRA**: diffusers' fused processor reads ``to_qkv``/``to_kv``, so
  adapters peft attaches to ``to_q``/``to_k``/``to_v`` would be skipped (see :func:`unfuse_qkv`,
  which the adapter path must call before loading a LoRA; :func:`is_fused` tells whether it must).
* ``vae_slicing``: ``pipe.vae.enable_slicing()`` decodes a batch one image at a time: the VAE
  decoder's activations at 512² are the peak of a batch render, so this lets batches grow without
  running out of memory. Bit-identical per image. On by default on CUDA.
* ``compile``: ``torch.compile`` of the UNet and the VAE decoder (in place, ``Module.compile``, so
  ``pipe.unet`` keeps its type and config). Minutes of compile per shape and no pixel guarantee
  (different kernels), so it is off unless asked for, and off on CPU. ``mode`` defaults to
  ``"max-autotune-no-cudagraphs"`` (safe with per-step callbacks and varying batch sizes);
  ``"reduce-overhead"`` adds CUDA graphs.

Nothing here imports diffusers at module import: only torch, and only when called.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

log = logging.getLogger("farm.worker.speed")

#: torch.compile mode used on CUDA unless another one is asked for.
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"
#: Compiled shapes kept per function (torch._dynamo's ``recompile_limit`` is raised to at least this).
COMPILE_SHAPE_LIMIT = 64


@dataclass(frozen=True)
class SpeedOptions:
    """The knobs :func:`optimize` applied (``compile_mode`` is ``None`` when ``compile`` is off)."""

    device: str
    channels_last: bool
    fuse_qkv: bool
    vae_slicing: bool
    compile: bool
    compile_mode: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def defaults(device: str) -> dict[str, bool]:
    """Each knob's default on ``device``: all on for CUDA except compile; all off on CPU.

    CPU keeps the unoptimized path (the tiny model gains nothing from NHWC or fused projections and
    CPU workers are the reference the tests compare against); every knob is still allowed there.
    """
    cuda = str(device).startswith("cuda")
    return {"channels_last": cuda, "fuse_qkv": cuda, "vae_slicing": cuda, "compile": False}


def optimize(
    pipe: Any,
    *,
    device: str,
    compile: bool | None = None,
    channels_last: bool | None = None,
    fuse_qkv: bool | None = None,
    vae_slicing: bool | None = None,
    compile_mode: str | None = None,
) -> SpeedOptions:
    """Apply the speed knobs to ``pipe`` in place (``None``: the device's default, see :func:`defaults`).

    Call it once, after ``pipe.to(device)`` and before the first render; calling it again with the
    same knobs is harmless (fusing and compiling are done once).
    """
    import torch

    chosen = defaults(device)
    for name, value in (("compile", compile), ("channels_last", channels_last), ("fuse_qkv", fuse_qkv), ("vae_slicing", vae_slicing)):
        if value is not None:
            chosen[name] = bool(value)
    cuda = str(device).startswith("cuda")

    if cuda:
        torch.backends.cudnn.benchmark = True  # picks the fastest conv algorithm per shape, once
    if chosen["channels_last"]:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if chosen["fuse_qkv"] and not is_fused(pipe):
        pipe.fuse_qkv_projections(unet=True, vae=True)
    if chosen["vae_slicing"]:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()
    mode = None
    if chosen["compile"]:
        mode = compile_mode or (DEFAULT_COMPILE_MODE if cuda else "default")
        import torch._dynamo.config as dynamo

        # dynamic=False: one graph per (batch, size); dynamo's default of 8 graphs per function
        # would silently fall back to eager past 8 shapes (e.g. batches 1-8 at two sizes).
        dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILE_SHAPE_LIMIT)
        if not getattr(pipe.unet, "_farm_compiled", False):
            pipe.unet.compile(mode=mode, fullgraph=False, dynamic=False)
            pipe.unet._farm_compiled = True
        if not getattr(pipe.vae.decoder, "_farm_compiled", False):
            pipe.vae.decoder.compile(mode=mode, fullgraph=False, dynamic=False)
            pipe.vae.decoder._farm_compiled = True
    options = SpeedOptions(device=str(device), compile_mode=mode, **chosen)
    log.info("speed options: %s", options.as_dict())
    return options


def is_fused(pipe: Any) -> bool:
    """True while the pipeline's attention runs on fused q/k/v projections."""
    return bool(getattr(pipe, "fusing_unet", False) or getattr(pipe, "fusing_vae", False))


def unfuse_qkv(pipe: Any) -> bool:
    """Go back to separate q/k/v projections (before loading a LoRA); True if it was fused.

    The separate projections were never removed, so this only switches the attention processors
    back (diffusers' ``unfuse_qkv_projections``) and drops the fused copies.
    """
    if not is_fused(pipe):
        return False
    pipe.unfuse_qkv_projections(unet=True, vae=True)
    return True


def freeze_compiled_shapes() -> None:
    """From now on, a shape without compiled code runs eagerly (``torch.compiler.set_stance``
    ``"eager_on_recompile"``): shapes compiled at warm-up keep their compiled code, and a request
    at an unusual size costs an eager render, not a compile stall of minutes. Process-wide."""
    import torch

    torch.compiler.set_stance("eager_on_recompile")


def warmup(
    pipe: Any,
    sizes: Iterable[tuple[int, int]],
    batch: int | Sequence[int] = 1,
    *,
    steps: int = 2,
    guidance_scale: float = 7.5,
) -> dict[str, float]:
    """Render each ``(width, height)`` at each batch size once (``steps`` steps, thrown away).

    With compile on this is where compilation happens (``dynamic=False``: one graph per shape, and
    classifier-free guidance doubles the UNet batch); without it, it warms cuDNN's algorithm choice
    and the allocator. Returns seconds per ``"WxH@B"``. Uses its own generator: the caller's RNG
    state is untouched.
    """
    import time

    import torch

    batches = [batch] if isinstance(batch, int) else list(batch)
    took: dict[str, float] = {}
    for width, height in sizes:
        for b in batches:
            started = time.perf_counter()
            with torch.inference_mode():
                pipe(
                    prompt=["warmup"] * b,
                    negative_prompt=[""] * b,
                    width=width,
                    height=height,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    generator=[torch.Generator("cpu").manual_seed(n) for n in range(b)],
                    output_type="pil",
                )
            took[f"{width}x{height}@{b}"] = round(time.perf_counter() - started, 3)
    log.info("warm-up: %s", took)
    return took

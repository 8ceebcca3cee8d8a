"""How many images of one size a worker renders at once: per GPU, per resolution.

A task carries up to ``FARM_MAX_BATCH_SIZE`` images that share a batch key; the worker renders them
in chunks of :meth:`BatchPlan.size_for` images. The chunk size for a ``WxH`` comes from, in order:

1. what this process learned: a chunk that ran out of GPU memory is halved and remembered
   (:meth:`BatchPlan.shrink`), so a size that does not fit is not tried again;
2. ``FARM_RENDER_BATCH_SIZES`` (``"512x512=16,768x768=6"``), set by the operator, or measured by
   :func:`calibrate` at worker start (on CUDA by default) and cached per GPU, model and torch version;
3. otherwise the whole task.

Each image has its own seeded generator, so chunking never changes what an image looks like
(up to float rounding between batch sizes).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from farm.settings import parse_batch_sizes
from farm.storage import atomic_write

log = logging.getLogger("farm.worker.batching")

Size = tuple[int, int]


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA's, or another backend's)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: str) -> None:
    """Give cached blocks back after an out-of-memory error, so the smaller chunk can allocate."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


class BatchPlan:
    """Chunk sizes per ``(width, height)``: configured or measured, shrunk on out-of-memory."""

    def __init__(self, sizes: Mapping[Size, int] | None = None):
        self._sizes: dict[Size, int] = dict(sizes or {})

    def size_for(self, width: int, height: int, wanted: int) -> int:
        """Images to render at once out of ``wanted`` waiting at ``width``×``height``."""
        cap = self._sizes.get((width, height))
        return max(1, min(wanted, cap)) if cap else max(1, wanted)

    def shrink(self, width: int, height: int, failed: int) -> int:
        """``failed`` images at once ran out of memory: remember half of it for this size."""
        smaller = max(1, failed // 2)
        self._sizes[(width, height)] = min(self._sizes.get((width, height), smaller), smaller)
        log.warning("out of memory at %d images of %dx%d: rendering %d at a time from now on", failed, width, height, smaller)
        return smaller

    def as_dict(self) -> dict[str, int]:
        return {f"{w}x{h}": n for (w, h), n in sorted(self._sizes.items())}


def calibrate(
    render: Callable[[int, int, int], None],
    sizes: Iterable[Size],
    candidates: Iterable[int],
    *,
    device: str = "cuda",
    tolerance: float = 0.03,
) -> dict[Size, int]:
    """Measure images/s at each candidate batch for each size; keep the best that fits.

    ``render(width, height, batch)`` renders one short batch (a warm-up call comes first, then the
    timed one). Stops growing a size at its first out-of-memory. Among batches within ``tolerance``
    of the best rate the smallest wins: same throughput, less memory and finer progress.
    """
    chosen: dict[Size, int] = {}
    for width, height in sizes:
        rates: dict[int, float] = {}
        for batch in sorted(set(candidates)):
            try:
                render(width, height, batch)  # warm-up: cuDNN algorithm choice, allocator, compile
                _sync(device)
                started = time.perf_counter()
                render(width, height, batch)
                _sync(device)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                free_memory(device)
                log.info("calibration: %d images of %dx%d do not fit", batch, width, height)
                break
            rates[batch] = batch / (time.perf_counter() - started)
        if not rates:
            chosen[(width, height)] = 1
            continue
        best = max(rates.values())
        chosen[(width, height)] = min(b for b, rate in rates.items() if rate >= best * (1 - tolerance))
        log.info(
            "calibration %dx%d: %s → batch %d",
            width, height, ", ".join(f"b{b} {r:.2f}/s" for b, r in rates.items()), chosen[(width, height)],
        )
    return chosen


def cached_calibration(path: Path, key: str, measure: Callable[[], dict[Size, int]]) -> dict[Size, int]:
    """``measure()`` once per ``key`` (GPU, model, torch, speed options), kept in the JSON file ``path``."""
    try:
        cache: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return parse_batch_sizes(cache[key])
    sizes = measure()
    cache[key] = ",".join(f"{w}x{h}={n}" for (w, h), n in sorted(sizes.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(cache, indent=1, sort_keys=True).encode())
    return sizes


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def calibrate_pipeline(model: Any, sizes: Iterable[Size], max_batch: int, *, cache_dir: Path, steps: int = 3) -> dict[Size, int]:
    """:func:`calibrate` a loaded model (``workers.diffusion.pipeline.LoadedModel``) with short renders of
    ``steps`` steps at batch 1, 2, 4… up to ``max_batch``; cached in ``cache_dir/batch-sizes.json``
    per device, model hash, torch version, speed options and sizes."""
    import platform

    import torch

    from workers.diffusion.speed import warmup

    sizes = list(sizes)
    candidates = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch} | {max_batch})
    cuda = str(model.device).startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else f"cpu {platform.machine()} x{torch.get_num_threads()}"
    speed = ",".join(f"{k}={v}" for k, v in sorted(model.speed.items()))
    key = "|".join(
        [device_name, model.hash, f"torch {torch.__version__}", speed, " ".join(f"{w}x{h}" for w, h in sizes),
         f"batches {candidates}", f"steps {steps}"]
    )

    def render(width: int, height: int, batch: int) -> None:
        warmup(model.pipe, [(width, height)], batch, steps=steps)

    return cached_calibration(
        cache_dir / "batch-sizes.json", key, lambda: calibrate(render, sizes, candidates, device=str(model.device))
    )

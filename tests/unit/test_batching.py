"""workers.diffusion.batching: chunk sizes per resolution, measured, cached, shrunk on out-of-memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from farm.settings import BUILTIN_TINY, Settings
from workers.diffusion.batching import BatchPlan, cached_calibration, calibrate, calibrate_pipeline, is_out_of_memory

torch.set_num_threads(1)


def test_plan_caps_each_size_and_renders_the_rest_whole() -> None:
    plan = BatchPlan({(512, 512): 6})
    assert plan.size_for(512, 512, 8) == 6
    assert plan.size_for(512, 512, 4) == 4
    assert plan.size_for(768, 768, 8) == 8  # not named: the whole task


def test_shrink_halves_and_never_grows_back() -> None:
    plan = BatchPlan({(512, 512): 6})
    assert plan.shrink(512, 512, 6) == 3
    assert plan.size_for(512, 512, 8) == 3
    plan.shrink(512, 512, 8)  # a late report of a bigger failure does not raise the cap again
    assert plan.size_for(512, 512, 8) == 3
    assert plan.shrink(768, 768, 1) == 1
    assert plan.as_dict() == {"512x512": 3, "768x768": 1}


def test_out_of_memory_errors_are_told_apart() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))


class FakeGpu:
    """Renders in ``cost(batch)`` fake seconds (via a fake clock); out of memory above ``fits``."""

    def __init__(self, monkeypatch, fits: int, cost):
        self.fits = fits
        self.cost = cost
        self.now = 0.0
        self.calls: list[tuple[int, int, int]] = []
        monkeypatch.setattr("workers.diffusion.batching.time.perf_counter", lambda: self.now)

    def __call__(self, width: int, height: int, batch: int) -> None:
        if batch > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory")
        self.calls.append((width, height, batch))
        self.now += self.cost(batch)


def test_calibrate_keeps_the_fastest_batch_that_fits(monkeypatch) -> None:
    # per-batch overhead 1 s + 0.25 s per image: bigger is faster until memory runs out above 8
    gpu = FakeGpu(monkeypatch, fits=8, cost=lambda b: 1.0 + 0.25 * b)
    chosen = calibrate(gpu, [(512, 512)], [1, 2, 4, 8, 16, 32], device="cpu")
    assert chosen == {(512, 512): 8}
    assert max(b for _, _, b in gpu.calls) == 8  # 32 is never tried after 16 ran out


def test_calibrate_prefers_the_smallest_batch_within_tolerance(monkeypatch) -> None:
    # throughput flat from batch 4 on (the GPU is saturated): take 4, it needs less memory
    gpu = FakeGpu(monkeypatch, fits=64, cost=lambda b: 1.0 * b if b >= 4 else 1.0 + 0.75 * b)
    assert calibrate(gpu, [(512, 512), (768, 768)], [1, 2, 4, 8, 16], device="cpu") == {(512, 512): 4, (768, 768): 4}


def test_calibrate_when_nothing_fits_says_one(monkeypatch) -> None:
    gpu = FakeGpu(monkeypatch, fits=0, cost=lambda b: 1.0)
    assert calibrate(gpu, [(1024, 1024)], [1, 2], device="cpu") == {(1024, 1024): 1}


def test_calibrate_lets_other_errors_through(monkeypatch) -> None:
    def broken(width, height, batch):
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError, match="device-side assert"):
        calibrate(broken, [(512, 512)], [1, 2], device="cpu")


def test_calibration_is_measured_once_per_key(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "batch-sizes.json"
    measured: list[str] = []

    def measure(value):
        def run():
            measured.append(value)
            return value

        return run

    assert cached_calibration(path, "H100|abc", measure({(512, 512): 8})) == {(512, 512): 8}
    assert cached_calibration(path, "H100|abc", measure({(512, 512): 2})) == {(512, 512): 8}  # from the file
    assert cached_calibration(path, "A10|abc", measure({(512, 512): 4})) == {(512, 512): 4}
    assert len(measured) == 2
    assert json.loads(path.read_text()) == {"A10|abc": "512x512=4", "H100|abc": "512x512=8"}


def test_calibrate_a_real_pipeline_and_use_it_in_a_worker(tmp_path: Path, monkeypatch) -> None:
    """On the tiny model (CPU): the worker measures its warm-up size at start, then a second start
    reads the cache instead of measuring again."""
    from workers.context import WorkerContext

    settings = Settings(
        data_dir=tmp_path, models={"tiny": BUILTIN_TINY}, render_warmup_sizes="64x64", render_calibrate=True,
        max_batch_size=2, torch_threads=1,
    )
    ctx = WorkerContext(settings=settings, model_name="tiny", device="cpu")
    ctx.model  # noqa: B018
    ctx.warm_up()
    chosen = ctx.batch_plan.size_for(64, 64, 8)
    assert chosen in (1, 2)
    cache = json.loads((tmp_path / "cache" / "batch-sizes.json").read_text())
    [(key, value)] = cache.items()
    assert ctx.model.hash in key and value == f"64x64={chosen}"

    # a fresh process: same answer, from the cache (a measurement would take seconds)
    def measure_again(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr("workers.diffusion.batching.calibrate", measure_again)
    again = calibrate_pipeline(ctx.model, [(64, 64)], 2, cache_dir=tmp_path / "cache")
    assert again == {(64, 64): chosen}


def test_sizes_set_by_the_operator_are_not_measured(tmp_path: Path) -> None:
    from workers.context import WorkerContext

    settings = Settings(
        data_dir=tmp_path, models={"tiny": BUILTIN_TINY}, render_warmup_sizes="64x64",
        render_batch_sizes="64x64=3", render_calibrate=True,
    )
    ctx = WorkerContext(settings=settings, model_name="tiny", device="cpu")
    ctx._model = object()  # warm_up must not touch the model: nothing to measure
    ctx.warm_up()
    assert ctx.batch_plan.size_for(64, 64, 8) == 3
    assert not (tmp_path / "cache" / "batch-sizes.json").exists()

"""workers.diffusion.speed on the tiny model (CPU): the speed knobs keep every pixel within 1/255."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from farm.settings import BUILTIN_TINY
from workers.diffusion.pipeline import load_pipeline
from workers.diffusion.speed import defaults, is_fused, optimize, unfuse_qkv, warmup

torch.set_num_threads(1)

OFF = {"channels_last": False, "fuse_qkv": False, "vae_slicing": False, "compile": False}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speed-models")


def _render(pipe, steps: int = 4) -> np.ndarray:
    with torch.inference_mode():
        images = pipe(
            prompt=["a red cat on a blue sea", "a green tree"],
            negative_prompt=["", "blurry"],
            num_inference_steps=steps,
            generator=[torch.Generator("cpu").manual_seed(s) for s in (7, 8)],
            output_type="np",
        ).images
    return np.asarray(images)


def test_defaults_per_device() -> None:
    assert defaults("cpu") == OFF
    assert defaults("cuda") == {"channels_last": True, "fuse_qkv": True, "vae_slicing": True, "compile": False}
    assert defaults("cuda:1")["fuse_qkv"] is True


def test_optimize_keeps_pixels_within_one_level(models_dir: Path) -> None:
    plain = load_pipeline("tiny", BUILTIN_TINY, models_dir=models_dir, device="cpu", speed=OFF)
    assert plain.speed["fuse_qkv"] is False and not is_fused(plain.pipe)
    reference = _render(plain.pipe)

    fast = load_pipeline(
        "tiny", BUILTIN_TINY, models_dir=models_dir, device="cpu",
        speed={"channels_last": True, "fuse_qkv": True, "vae_slicing": True},
    )
    assert fast.speed == {
        "device": "cpu", "channels_last": True, "fuse_qkv": True, "vae_slicing": True, "compile": False,
        "compile_mode": None,
    }
    pipe = fast.pipe
    assert is_fused(pipe) and pipe.vae.use_slicing
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert "Fused" in type(next(iter(pipe.unet.attn_processors.values()))).__name__
    out = _render(pipe)
    assert out.shape == reference.shape
    assert np.abs(out - reference).max() <= 1 / 255

    # applying it again changes nothing; unfusing (before a LoRA) goes back to separate projections
    optimize(pipe, device="cpu", channels_last=True, fuse_qkv=True, vae_slicing=True)
    assert unfuse_qkv(pipe) is True and not is_fused(pipe)
    assert unfuse_qkv(pipe) is False
    assert "Fused" not in type(next(iter(pipe.unet.attn_processors.values()))).__name__
    assert np.abs(_render(pipe) - reference).max() <= 1 / 255


def test_warmup_renders_each_shape(models_dir: Path) -> None:
    model = load_pipeline("tiny", BUILTIN_TINY, models_dir=models_dir, device="cpu")
    assert model.speed["compile"] is False  # CPU default: nothing changed
    state = torch.random.get_rng_state()
    took = warmup(model.pipe, [(64, 64), (64, 128)], [1, 2], steps=1)
    assert set(took) == {"64x64@1", "64x64@2", "64x128@1", "64x128@2"}
    assert all(seconds > 0 for seconds in took.values())
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.slow  # ~1 min of torch.compile; CI runs it (`-m "not slow"` skips it while editing)
def test_after_warmup_other_shapes_run_eagerly_instead_of_compiling(models_dir: Path) -> None:
    """torch.compile on CPU (~1 min): the warm-up shape is compiled; afterwards a batch of another
    size renders at once, eagerly, with no new graph, and the compiled shape keeps its code."""
    from torch._dynamo.utils import counters

    from workers.diffusion.speed import freeze_compiled_shapes

    model = load_pipeline("tiny", BUILTIN_TINY, models_dir=models_dir, device="cpu", speed=OFF)
    eager = _render(model.pipe)  # batch 2, before compiling
    optimize(model.pipe, device="cpu", compile=True)
    try:
        warmup(model.pipe, [(64, 64)], 1)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        freeze_compiled_shapes()
        frozen = _render(model.pipe)  # batch 2 was never compiled: eager, no compile
        assert counters["stats"]["unique_graphs"] == graphs
        assert np.abs(frozen - eager).max() <= 1 / 255
        took = warmup(model.pipe, [(64, 64)], 1)  # the compiled shape still runs (no recompile)
        assert counters["stats"]["unique_graphs"] == graphs and took["64x64@1"] < 10
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()

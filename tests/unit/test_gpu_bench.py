"""bench/gpu.py on CPU with the tiny model: it runs end to end (moto S3) and reports every figure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("farm_bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_run_prints_every_key(capsys) -> None:
    bench = _bench()
    report = bench.main(
        ["--device", "cpu", "--tiny", "--threads", "1", "--batches", "1,2", "--images", "4", "--repeats", "1"]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == report
    assert set(bench.KEYS) <= set(report)
    assert report["device"] == "cpu" and report["model"] == "builtin:tiny" and report["size"] == 64
    for key in ("farm_images_per_s", "diffusers_b1_images_per_s", "diffusers_best_images_per_s", "ratio_vs_b1",
                "ratio_vs_best", "upload_wait_ms_per_image", "peak_memory_mb", "seconds"):
        assert report[key] > 0, key
    assert set(report["ms_per_image"]) == set(bench.PHASES)
    assert all(value > 0 for value in report["ms_per_image"].values()), report["ms_per_image"]
    assert set(report["diffusers_images_per_s"]) == set(report["farm_render_images_per_s"]) == {"1", "2"}
    assert report["farm_batch"] in (1, 2)
    assert 0 <= report["gpu_idle_percent"] < 100 and 0 <= report["no_overlap_gpu_idle_percent"] < 100
    assert report["farm_no_overlap_images_per_s"] > 0
    ratio = report["farm_images_per_s"] / report["diffusers_b1_images_per_s"]
    assert abs(report["ratio_vs_b1"] - ratio) < 0.01 * ratio  # both rounded to 3 decimals


def test_sd15_architecture_matches_the_real_one() -> None:
    """Built on the meta device (no memory, no weights): the parameter counts of SD1.5's components."""
    bench = _bench()
    tokenizer = bench.clip_sized_tokenizer()
    assert len(tokenizer) == 49408 and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    pipe = bench.build_sd15("meta", torch.float16)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(pipe.unet) == 859_520_964
    assert count(pipe.vae) == 83_653_863
    assert count(pipe.text_encoder) == 123_060_480
    assert pipe.vae_scale_factor == 8 and pipe.unet.dtype == torch.float16

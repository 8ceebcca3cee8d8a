"""LoRA serving costs on a worker: cold (download + load), from disk, switch; and a job stream.

    python bench/lora.py [--jobs 36] [--steps 10]

Uses the tiny random model and six tiny LoRAs, the worker's own LoraDiskCache + AdapterSet over a
file:// store (a download here is a local copy: on S3 add the transfer time). The stream renders one
64² image per job cycling over the six LoRAs, with the caches (up to 8 adapters loaded) and with a
reload every job (what a worker without an adapter cache does). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from farm.storage.keys import content_key
from farm.request.spec import ImageSpec
from farm.storage import FileStorage
from workers.lora.adapters import AdapterSet
from workers.lora.disk_cache import LoraDiskCache
from workers.diffusion.pipeline import load_pipeline
from workers.diffusion.render import render_batch
from evaluation.tiny_lora import make_tiny_lora


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=36)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    args = parser.parse_args()
    import hashlib

    import torch

    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="farm-lora-bench-"))
    model = load_pipeline("tiny", "builtin:tiny", models_dir=root / "models", device="cpu")
    store = FileStorage(root / "store")
    shas = []
    for n in range(6):
        file = make_tiny_lora(model, root / f"l{n}.safetensors", seed=n + 1)
        sha = hashlib.sha256(file.read_bytes()).hexdigest()
        store.put(content_key("loras", sha, "safetensors"), file.read_bytes(), content_type="application/octet-stream")
        shas.append(sha)

    def fresh_cache(tag: str) -> LoraDiskCache:
        return LoraDiskCache(store, root / f"cache-{tag}", max_bytes=10**9, min_free_bytes=0)

    # cold: download + load; disk: load only; switch: between loaded adapters
    cold, disk, switch = [], [], []
    for n, sha in enumerate(shas):
        cache, adapters = fresh_cache(f"cold{n}"), AdapterSet(model.pipe, max_loaded=8)
        started = time.perf_counter()
        path, _ = cache.path(sha, content_key("loras", sha, "safetensors"))
        adapters.activate([(sha, path, 1.0)])
        cold.append(time.perf_counter() - started)
        adapters.clear()
        started = time.perf_counter()
        path, served = cache.path(sha, content_key("loras", sha, "safetensors"))
        adapters.activate([(sha, path, 1.0)])
        disk.append(time.perf_counter() - started)
        adapters.clear()
    adapters = AdapterSet(model.pipe, max_loaded=8)
    cache = fresh_cache("switch")
    paths = {sha: cache.path(sha, content_key("loras", sha, "safetensors"))[0] for sha in shas}
    for sha in shas:
        adapters.activate([(sha, paths[sha], 1.0)])
    for n in range(24):
        sha = shas[n % 6]
        started = time.perf_counter()
        adapters.activate([(sha, paths[sha], 0.8)])
        switch.append(time.perf_counter() - started)
    adapters.clear()

    def stream(reload_every_job: bool) -> float:
        adapters = AdapterSet(model.pipe, max_loaded=8)
        started = time.perf_counter()
        for n in range(args.jobs):
            sha = shas[n % 6]
            if reload_every_job:
                adapters.clear()
            adapters.activate([(sha, paths[sha], 0.8)])
            spec = ImageSpec(prompt="a red circle", negative_prompt="", seed=n, steps=args.steps, guidance_scale=7.5,
                             width=64, height=64, scheduler="euler", model="tiny")
            render_batch(model, [spec], base_scheduler_config=model.scheduler_config)
        seconds = time.perf_counter() - started
        adapters.clear()
        return args.jobs / seconds

    reload_rate = stream(True)
    cached_rate = stream(False)
    ms = lambda xs: round(statistics.median(xs) * 1000, 1)  # noqa: E731
    print(f"cold (download + load): {ms(cold)} ms, from disk: {ms(disk)} ms, switch: {ms(switch)} ms")
    print(f"stream over 6 LoRAs: {cached_rate:.2f} images/s with the caches, {reload_rate:.2f} reloading every job")
    print(json.dumps({
        "cold_ms": ms(cold), "disk_ms": ms(disk), "switch_ms": ms(switch),
        "stream_images_per_s_cached": round(cached_rate, 2), "stream_images_per_s_reload": round(reload_rate, 2),
        "jobs": args.jobs, "steps": args.steps,
    }))


if __name__ == "__main__":
    main()

"""How long the worker's render path takes per image, by batch size (CPU or GPU).

    python bench/render.py [--model builtin:tiny] [--device cpu] [--size 64] [--steps 25]

Prints one line per batch size, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from farm.request.spec import ImageSpec
from workers.diffusion.pipeline import load_pipeline
from workers.diffusion.render import render_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:tiny", help="a diffusers folder or builtin:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    models_dir = Path(tempfile.mkdtemp(prefix="farm-bench-"))
    started = time.perf_counter()
    model = load_pipeline("bench", args.model, models_dir=models_dir, device=args.device)
    load_seconds = time.perf_counter() - started
    figures = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        specs = [
            ImageSpec(prompt="a red circle on a blue background", negative_prompt="", seed=i, steps=args.steps,
                      guidance_scale=7.5, width=args.size, height=args.size, scheduler=args.scheduler, model="bench")
            for i in range(batch)
        ]
        render_batch(model, specs, base_scheduler_config=model.scheduler_config)  # warm-up
        best = min(
            render_batch(model, specs, base_scheduler_config=model.scheduler_config).seconds
            for _ in range(args.repeats)
        )
        figures[batch] = best
        print(f"batch {batch}: {best:.3f} s per batch, {best / batch * 1000:.0f} ms per image, {batch / best:.2f} images/s")
    print(json.dumps({
        "device": args.device, "model": args.model, "size": args.size, "steps": args.steps,
        "scheduler": args.scheduler, "load_seconds": round(load_seconds, 2),
        "images_per_s": {str(b): round(b / s, 3) for b, s in figures.items()},
    }))


if __name__ == "__main__":
    main()

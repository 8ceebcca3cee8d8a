"""How long one shapes-model image takes on this CPU at the model's default settings.

    python bench/shapes_cpu.py [--model models/shapes] [--repeats 10] [--threads 2]

Loads the model with the farm's loader, renders one warm-up image, then times ``--repeats`` single
images (batch 1) and one batch of 8 through ``workers.diffusion.render.render_batch``. Prints a JSON last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from evaluation import checks as S

    path = args.model or S.DEFAULT_MODEL
    t0 = time.perf_counter()
    model = S.load(path, device="cpu")
    load_s = time.perf_counter() - t0
    d = S.model_defaults(path)
    prompt = "a red circle on a blue background"
    S.render(model, [prompt], [0])  # warm-up
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        S.render(model, [prompt], [i + 1])
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    S.render(model, [prompt] * 8, list(range(100, 108)), batch_size=8)
    batch8 = time.perf_counter() - t
    print(json.dumps({
        "seconds_per_image": round(statistics.median(times), 4),
        "seconds_per_image_min": round(min(times), 4),
        "seconds_per_image_in_batch_of_8": round(batch8 / 8, 4),
        "load_seconds": round(load_s, 2),
        "steps": d["default_steps"], "guidance_scale": d["default_guidance_scale"], "scheduler": d["scheduler"],
        "width": d["width"], "height": d["height"], "threads": torch.get_num_threads(), "repeats": args.repeats,
        "device": "cpu",
    }))


if __name__ == "__main__":
    main()

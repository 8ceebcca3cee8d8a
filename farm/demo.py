"""``farm demo``: the whole flow on the embedded defaults, no server needed.

Submits two prompts × four images, starts a real worker process, waits with a progress bar,
downloads the PNGs with a ``metadata.jsonl`` and writes a contact sheet.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from farm.client import Farm
from farm.imaging.contact_sheet import contact_sheet
from farm.errors import FarmError
from farm.catalogue import recommended
from farm.settings import Settings

PROMPTS = [
    ("a red circle on a blue background", ""),
    ("a yellow triangle on a green background", ""),
]
IMAGES_PER_PROMPT = 4
#: size, steps and guidance when the model ships none (the shapes model's farm.json gives its own)
DEFAULTS = {"width": 128, "height": 128, "steps": 20, "guidance_scale": 7.5}


def run_demo(settings: Settings, out: Path, *, device: str = "cpu", timeout: float = 900) -> Path:
    out = Path(out)
    model = settings.default_model
    defaults = {**DEFAULTS, **recommended(settings, model)}
    with Farm(settings) as farm:
        job = farm.submit_many(
            [
                {
                    "prompt": prompt,
                    "negative_prompt": negative,
                    "num_images": IMAGES_PER_PROMPT,
                    "seed": 1000 * (n + 1),
                    "model": model,
                    **defaults,
                }
                for n, (prompt, negative) in enumerate(PROMPTS)
            ],
            label="demo",
        )
        print(f"submitted {job.id}; starting a worker for model {model!r} on {device}", file=sys.stderr)
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers.main", "--model", model, "--device", device,
             "--name", f"demo@{socket.gethostname()}", "--loglevel", "WARNING"],
        )
        try:
            final = job.wait(timeout=timeout, progress=True)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if not final.succeeded:
            errors = {r.error for r in job.results() if r.error}
            raise FarmError(f"demo did not fully succeed: {final}; errors: {sorted(errors)}")
        paths = job.download(out)
        captions = {}
        with open(out / "metadata.jsonl", encoding="utf-8") as meta:
            for line in meta:
                row = json.loads(line)
                captions[row["file_name"]] = f"{row['prompt']} (seed {row['seed']})"
        contact_sheet([(p, captions[p.name]) for p in paths], out / "contact_sheet.png")
    return out

"""``farm demo``: the whole flow on the embedded defaults, no server needed.

Submits two prompts × four images, starts a real worker process, waits (with a progress bar on a
terminal), downloads the PNGs with a ``metadata.jsonl`` and writes a contact sheet.

Quiet by design: the worker's output (Celery's banner, its log, library warnings) and any warning
raised in this process go to ``<out>/worker.log``; the terminal gets a few plain lines on stderr
saying what happens, how many images succeeded, where they are and where the log is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Iterator

from farm.catalogue import Catalogue
from farm.client import Farm
from farm.errors import FarmError
from farm.imaging.contact_sheet import contact_sheet
from farm.progress import wait_until
from farm.settings import Settings

PROMPTS = [
    ("a red circle on a blue background", ""),
    ("a yellow triangle on a green background", ""),
]
IMAGES_PER_PROMPT = 4
#: the file in the out folder that takes the worker's output and this process's warnings
LOG_NAME = "worker.log"


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def warnings_to(log: IO[str]) -> Iterator[None]:
    """Send this process's warnings (``warnings.warn``) and library log records to ``log``, not stderr."""
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("[demo %(asctime)s %(levelname)s %(name)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)


def run_demo(settings: Settings, out: Path, *, device: str = "cpu", timeout: float = 900) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    with open(log_path, "w", encoding="utf-8", buffering=1) as log, warnings_to(log):
        return _run(settings, out, log, log_path, device=device, timeout=timeout)


def _run(settings: Settings, out: Path, log: IO[str], log_path: Path, *, device: str, timeout: float) -> Path:
    model = settings.default_model
    defaults = Catalogue(settings).defaults(model)  # its farm.json (shapes: 64×64, 20 steps), else the settings
    started = time.monotonic()
    with Farm(settings) as farm:
        job = farm.submit_many(
            [
                {
                    "prompt": prompt,
                    "negative_prompt": negative,
                    "num_images": IMAGES_PER_PROMPT,
                    "seed": 1000 * (n + 1),
                    "model": model,
                }
                for n, (prompt, negative) in enumerate(PROMPTS)
            ],
            label="demo",
        )
        total = len(PROMPTS) * IMAGES_PER_PROMPT
        say(
            f"rendering {total} images ({len(PROMPTS)} prompts × {IMAGES_PER_PROMPT}, model {model!r}, "
            f"{defaults.width}×{defaults.height}, {defaults.steps} steps) with a worker process on {device}"
        )
        say(f"worker log: {log_path}")
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers.main", "--model", model, "--device", device,
             "--name", f"demo@{socket.gethostname()}", "--loglevel", "INFO"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            final = wait_until(
                job.status,
                lambda status: status.done or worker.poll() is not None,
                timeout=timeout,
                poll_interval=0.5,
                progress=sys.stderr.isatty(),  # a bar on a terminal; nothing in a captured output
                desc=job.id[:8],
                timed_out=lambda status: f"{status} after {timeout} s",
            )
        except BaseException:
            with contextlib.suppress(Exception):
                job.cancel()
            raise
        finally:
            _stop(worker)
        if not final.done:
            job.cancel()
            raise FarmError(
                f"the demo's worker exited (code {worker.returncode}) with {final.finished}/{final.total} "
                f"images finished; its log: {log_path}"
            )
        succeeded = final.counts.get("succeeded", 0)
        say(f"{succeeded}/{final.total} images succeeded in {time.monotonic() - started:.0f} s")
        if not final.succeeded:
            errors = {r.error for r in job.results() if r.error}
            raise FarmError(f"demo did not fully succeed: {final}; errors: {sorted(errors)}; worker log: {log_path}")
        paths = job.download(out)
        captions = {}
        with open(out / "metadata.jsonl", encoding="utf-8") as meta:
            for line in meta:
                row = json.loads(line)
                captions[row["file_name"]] = f"{row['prompt']} (seed {row['seed']})"
        contact_sheet([(p, captions[p.name]) for p in paths], out / "contact_sheet.png")
    say(f"images: {out}/ ({len(paths)} PNGs, metadata.jsonl, contact_sheet.png)")
    return out


def _stop(worker: subprocess.Popen) -> None:
    """A warm shutdown (uploads finish), then a kill after a minute."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(timeout=10)

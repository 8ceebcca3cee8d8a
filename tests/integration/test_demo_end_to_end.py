"""``farm demo`` as a newcomer runs it: a real worker process on the embedded defaults, and a quiet
terminal (no Celery banner, no library warnings: those go to the log file the demo names)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

BANNER_MARKS = ("celery@", "[tasks]", "-------------- ", "[queues]", ".> transport:")


def test_demo_prints_a_short_quiet_summary_and_leaves_the_images(tmp_path: Path):
    out = tmp_path / "demo-out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    farm = Path(sys.executable).parent / "farm"
    done = subprocess.run(
        [str(farm), "demo", "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    log = out / "worker.log"
    assert done.returncode == 0, output + (log.read_text(errors="replace")[-4000:] if log.exists() else "")

    lines = output.splitlines()
    assert len(lines) <= 8, output
    for mark in BANNER_MARKS:
        assert mark not in output, f"{mark!r} in the demo's output:\n{output}"
    assert not [line for line in lines if "warning" in line.lower()], output
    assert str(log) in output and log.is_file()
    assert "8/8 images succeeded" in output
    assert done.stdout.strip().splitlines()[-1] == str(out)

    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 8
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (64, 64)
    assert (out / "metadata.jsonl").read_text().count("\n") == 8
    assert (out / "contact_sheet.png").is_file()
    # what left the terminal is in the log: the worker's banner and its log lines
    text = log.read_text(errors="replace")
    assert "[tasks]" in text and " ready." in text

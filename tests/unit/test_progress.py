"""Progress a person can watch: waiting advances by denoising steps while a batch renders, and a
download of unfinished work says what is missing instead of pretending to be complete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from farm import Farm, Settings, lifecycle
from farm.db.tables import ImageRecord


def test_status_counts_the_steps_a_worker_has_done(tmp_path: Path) -> None:
    with Farm(Settings(data_dir=tmp_path)) as farm:
        job = farm.submit("a red circle", num_images=4, steps=10)
        ids = [r.id for r in job.results()]
        assert (job.status().steps_done, job.status().steps_total) == (0, 40)
        claim = lifecycle.claim(farm.sessions, ids[:2], worker="w", lease_seconds=60, max_attempts=3)
        lifecycle.report_progress(farm.sessions, claim.token, ids[:2], 6, 10)
        status = job.status()
        assert (status.finished, status.steps_done, status.steps_total) == (0, 12, 40)  # moved before any image finished
        lifecycle.record_success(farm.sessions, claim.token, ids[0], storage_key="images/x.png")
        assert job.status().steps_done == 16  # a finished image counts whole
        # a claim that lost its images (canceled) reports nothing
        job.cancel()
        assert lifecycle.report_progress(farm.sessions, claim.token, ids[:2], 9, 10) == 0


def test_img2img_progress_is_scaled_to_the_images_own_steps(tmp_path: Path) -> None:
    with Farm(Settings(data_dir=tmp_path)) as farm:
        job = farm.submit("x", steps=20)
        [image_id] = [r.id for r in job.results()]
        claim = lifecycle.claim(farm.sessions, [image_id], worker="w", lease_seconds=60, max_attempts=3)
        lifecycle.report_progress(farm.sessions, claim.token, [image_id], 3, 15)  # strength 0.75: 15 real steps
        with farm.sessions() as session:
            assert session.get(ImageRecord, image_id).steps_done == 4
        assert job.status().steps_done == 4


def test_download_of_unfinished_work_exits_1_unless_partial(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env["FARM_DATA_DIR"] = str(tmp_path / "data")
    with Farm(Settings(data_dir=tmp_path / "data")) as farm:
        job = farm.submit("x", num_images=3)
        ids = [r.id for r in job.results()]
        claim = lifecycle.claim(farm.sessions, ids[:1], worker="w", lease_seconds=60, max_attempts=3)
        farm.storage.put("images/done.png", b"\x89PNG fake", content_type="image/png")
        lifecycle.record_success(farm.sessions, claim.token, ids[0], storage_key="images/done.png")

    def download(*extra: str):
        return subprocess.run([sys.executable, "-m", "farm", "download", job.id, str(tmp_path / "out"), *extra],
                              capture_output=True, text=True, env=env, timeout=120)

    refused = download()
    assert refused.returncode == 1
    assert "2 of 3 image(s)" in refused.stderr and "--partial" in refused.stderr
    assert not (tmp_path / "out").exists()
    partial = download("--partial")
    assert partial.returncode == 0, partial.stderr
    assert "1 image(s)" in partial.stdout and "2 not (yet) succeeded" in partial.stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == 1

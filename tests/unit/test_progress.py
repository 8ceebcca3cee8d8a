"""Progress a person can watch: waiting advances by denoising steps while a batch renders, and a
download of unfinished work says what is missing instead of pretending to be complete.

An embedded farm with no worker (``embedded_farm``); the worker's side of the lifecycle is called
directly, and ``farm download`` runs in this process (``farm_cli``)."""

from __future__ import annotations

from pathlib import Path

from farm import Farm, lifecycle
from farm.db.tables import ImageRecord


def test_status_counts_the_steps_a_worker_has_done(embedded_farm: Farm) -> None:
    farm = embedded_farm
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


def test_img2img_progress_is_scaled_to_the_images_own_steps(embedded_farm: Farm) -> None:
    farm = embedded_farm
    job = farm.submit("x", steps=20)
    [image_id] = [r.id for r in job.results()]
    claim = lifecycle.claim(farm.sessions, [image_id], worker="w", lease_seconds=60, max_attempts=3)
    lifecycle.report_progress(farm.sessions, claim.token, [image_id], 3, 15)  # strength 0.75: 15 real steps
    with farm.sessions() as session:
        assert session.get(ImageRecord, image_id).steps_done == 4
    assert job.status().steps_done == 4


def test_download_of_unfinished_work_exits_1_unless_partial(embedded_farm: Farm, farm_cli, tmp_path: Path) -> None:
    farm = embedded_farm
    job = farm.submit("x", num_images=3)
    ids = [r.id for r in job.results()]
    claim = lifecycle.claim(farm.sessions, ids[:1], worker="w", lease_seconds=60, max_attempts=3)
    farm.storage.put("images/done.png", b"\x89PNG fake", content_type="image/png")
    lifecycle.record_success(farm.sessions, claim.token, ids[0], storage_key="images/done.png")

    refused = farm_cli("download", job.id, tmp_path / "out")
    assert refused.exit_code == 1
    assert "2 of 3 image(s)" in refused.stderr and "--partial" in refused.stderr
    assert not (tmp_path / "out").exists()
    partial = farm_cli("download", job.id, tmp_path / "out", "--partial")
    assert partial.exit_code == 0, partial.stderr
    assert "1 image(s)" in partial.stdout and "2 not (yet) succeeded" in partial.stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == 1

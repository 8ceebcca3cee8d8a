"""What an operator reads: `farm status` says what a submission is (label or campaign, model) and
groups failures by reason class with a count and one example; a campaign that has nothing left says
it finished, and its rate is recent, not an average since the start."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from farm import lifecycle
from farm.db.tables import ImageRecord, utcnow


def _ids(farm, where) -> list[str]:
    with farm.sessions() as session:
        return list(session.scalars(select(ImageRecord.id).where(where).order_by(ImageRecord.position)))


def _fail(farm, ids, error) -> None:
    claim = lifecycle.claim(farm.sessions, ids, worker="w", lease_seconds=60, max_attempts=5)
    lifecycle.record_failure(farm.sessions, claim.token, ids, error)


def test_status_groups_failures_by_reason_class(embedded_farm) -> None:
    farm = embedded_farm
    job = farm.submit_many([{"prompt": "a red circle", "num_images": 5}], label="nightly shapes")
    ids = _ids(farm, ImageRecord.submission_id == job.id)
    for n, image_id in enumerate(ids[:3]):  # one outage, three object keys: one line
        _fail(farm, [image_id], f"StorageUnavailable: S3 did not answer for images/{image_id}.png (attempt {n})")
    _fail(farm, ids[3:4], "InputError: init image is not an image")

    status = job.status()
    assert status.label == "nightly shapes" and status.models == (farm.settings.default_model,)
    assert {name: count for name, (count, _) in status.failures.items()} == {"storage": 3, "input": 1}
    text = str(status).splitlines()
    assert text[0].startswith(f"{job.id} [nightly shapes · {farm.settings.default_model}]: 4/5 finished")
    assert text[1].startswith("  failed ×3 storage: StorageUnavailable: S3 did not answer")
    assert text[2] == "  failed ×1 input: InputError: init image is not an image"


def test_campaign_status_finishes_and_measures_a_recent_rate(embedded_farm) -> None:
    farm = embedded_farm
    campaign = farm.campaign("views")
    campaign.submit([{"prompt": f"shape {i}"} for i in range(4)])
    ids = _ids(farm, ImageRecord.campaign_id.is_not(None))
    claim = lifecycle.claim(farm.sessions, ids, worker="w", lease_seconds=60, max_attempts=5)
    now = utcnow()
    with farm.sessions.begin() as session:  # two finished long ago, one a minute ago
        session.execute(update(ImageRecord).where(ImageRecord.id.in_(ids[:2])).values(started_at=now - timedelta(hours=5)))
    for image_id in ids[:3]:
        lifecycle.record_success(farm.sessions, claim.token, image_id, storage_key=f"k/{image_id}")
    with farm.sessions.begin() as session:
        session.execute(update(ImageRecord).where(ImageRecord.id.in_(ids[:2])).values(finished_at=now - timedelta(hours=4)))
        session.execute(update(ImageRecord).where(ImageRecord.id == ids[2]).values(finished_at=now - timedelta(seconds=60)))

    running = campaign.status()
    assert running.state == "active"
    # 1 image in the last 10 minutes, not 3 over five hours
    assert running.images_per_s is not None and abs(running.images_per_s - 1 / 600) < 1e-4

    lifecycle.record_failure(farm.sessions, claim.token, ids[3:], "RuntimeError: CUDA error: an illegal memory access")
    done = campaign.status()
    assert done.state == "finished" and done.images_per_s is None
    assert done.failures == {"render": (1, "RuntimeError: CUDA error: an illegal memory access")}
    assert str(done).startswith("views [finished]: 4/4 finished")

"""Cross-job batching (``FARM_TOP_UP``): a claim tops its last chunk up with queued images of other
tasks that share the batch key, in the same transaction, highest priority then oldest first.

Claims run on embedded SQLite (each test its own database, through ``farm_settings``); the worker
tests run ``workers.tasks.run_render`` for real on the tiny model (CPU) with in-memory storage.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select, update

from farm import cross_job, lifecycle
from farm.db.tables import CampaignRecord, ImageRecord, utcnow
from farm.settings import Settings
from farm.storage.keys import image_key

LEASE = 30.0


@pytest.fixture
def settings(farm_settings: Settings) -> Settings:
    return Settings(data_dir=farm_settings.data_dir, max_batch_size=8)




@pytest.fixture
def submit(sessions, settings, make_spec) -> Callable[..., list[str]]:
    """``submit(n=1, *, campaign_priority=None, age=0, **spec_fields)``: record one submission of ``n``
    images (seeds 1…n unless given) as the client does, optionally in a new campaign of that priority,
    queued ``age`` seconds ago; returns its image ids (one task when ``n`` ≤ 8)."""
    seeds = iter(range(1, 10_000))

    def submit(n: int = 1, *, campaign_priority: int | None = None, age: float = 0, **fields) -> list[str]:
        specs = [make_spec(**{"seed": next(seeds), **fields}) for _ in range(n)]
        campaign_id = None
        if campaign_priority is not None:
            campaign_id = str(uuid.uuid4())
            with sessions.begin() as session:
                session.add(CampaignRecord(id=campaign_id, name=f"c-{campaign_id[:8]}", priority=campaign_priority))
        _, batches = lifecycle.record(sessions, specs, num_requests=1, settings=settings, campaign_id=campaign_id)
        ids = [image_id for batch in batches for image_id in batch.image_ids]
        with sessions.begin() as session:
            session.execute(
                update(ImageRecord).where(ImageRecord.id.in_(ids)).values(queued_at=utcnow() - timedelta(seconds=age))
            )
        return ids

    return submit


def _claim(sessions, ids, *, chunk: int | None = 8, worker="w1", max_attempts=3) -> lifecycle.Claim:
    top_up = None if chunk is None else (lambda width, height: chunk)
    return lifecycle.claim(sessions, ids, worker=worker, lease_seconds=LEASE, max_attempts=max_attempts, top_up=top_up)


def _rows(sessions, ids) -> dict[str, ImageRecord]:
    with sessions() as session:
        return {row.id: row for row in session.scalars(select(ImageRecord).where(ImageRecord.id.in_(ids)))}


def test_two_compatible_single_image_jobs_share_one_claim(sessions, submit) -> None:
    [a], [b] = submit(prompt="a red cube"), submit(prompt="a blue cone")
    task_of_b = _rows(sessions, [b])[b].task_id
    got = _claim(sessions, [a])
    assert [image.id for image in got.images] == [a, b]  # the task's own first
    assert got.topped_up == [b]
    rows = _rows(sessions, [a, b])
    assert {rows[i].status for i in (a, b)} == {"running"}
    assert {rows[i].claim_token for i in (a, b)} == {got.token}
    assert rows[b].attempts == 1 and rows[b].worker == "w1" and rows[b].publish_after is None

    # b's own message: nothing to claim; this worker holds it, so it is not republished either ...
    again = _claim(sessions, [b], worker="w1")
    assert again.images == [] and again.held_elsewhere == [] and again.topped_up == []
    # ... another worker sees it held elsewhere (its lease decides, as for a duplicate delivery)
    other = _claim(sessions, [b], worker="w2")
    assert other.images == [] and other.held_elsewhere == [b]
    assert _rows(sessions, [b])[b].claim_token == got.token

    # leases, progress, results and hand-back cover the topped-up image like the task's own
    assert lifecycle.heartbeat(sessions, got.token, LEASE) == 2
    assert lifecycle.report_progress(sessions, got.token, [a, b], 2, 4) == 2
    assert lifecycle.record_success(sessions, got.token, b, storage_key="images/b.png")
    assert lifecycle.release(sessions, got.token) == 1  # a goes back; b is done
    rows = _rows(sessions, [a, b])
    assert rows[a].status == "queued" and rows[b].status == "succeeded"
    assert rows[b].task_id == task_of_b  # handed back or swept, an image goes out under its own task


def test_the_setting_is_on_by_default_and_farm_top_up_0_turns_it_off(farm_settings, monkeypatch) -> None:
    assert Settings(data_dir=farm_settings.data_dir).top_up is True
    monkeypatch.setenv("FARM_TOP_UP", "0")
    assert Settings(data_dir=farm_settings.data_dir).top_up is False


def test_without_top_up_a_claim_takes_its_task_only(sessions, submit) -> None:
    [a], [b] = submit(), submit()
    got = _claim(sessions, [a], chunk=None)
    assert [image.id for image in got.images] == [a] and got.topped_up == []
    assert _rows(sessions, [b])[b].status == "queued"


@pytest.mark.parametrize(
    ("own", "chunk", "taken"),
    [
        (1, 3, 2),   # one image, chunk 3: two more
        (3, 3, 0),   # the chunk is full already
        (4, 3, 2),   # chunks 3 + 1: the last one filled to 3
        (1, 1, 0),   # a worker that renders one at a time never tops up
        (2, 8, 6),
    ],
)
def test_the_claim_fills_its_last_chunk_and_no_more(sessions, submit, own: int, chunk: int, taken: int) -> None:
    mine = submit(own)
    waiting = [image_id for _ in range(8) for image_id in submit(1)]
    got = _claim(sessions, mine, chunk=chunk)
    assert [image.id for image in got.images] == mine + waiting[:taken]  # the oldest first
    assert got.topped_up == waiting[:taken]
    assert sum(row.status == "queued" for row in _rows(sessions, waiting).values()) == 8 - taken


@pytest.mark.parametrize(
    "difference",
    [
        pytest.param({"steps": 5}, id="steps"),
        pytest.param({"width": 128}, id="width"),
        pytest.param({"height": 128}, id="height"),
        pytest.param({"guidance_scale": 5.0}, id="guidance"),
        pytest.param({"scheduler": "euler"}, id="scheduler"),
        pytest.param({"model": "shapes"}, id="model"),
        pytest.param({"clip_skip": 2}, id="clip-skip"),
        pytest.param({"loras": (("a" * 64, 0.8),)}, id="lora-set"),
        pytest.param({"mode": "img2img", "init_image_key": "inputs/x.png", "strength": 0.5}, id="mode"),
    ],
)
def test_images_of_another_batch_key_are_never_mixed_in(sessions, submit, difference) -> None:
    [a] = submit()
    others = [image_id for _ in range(3) for image_id in submit(age=10, **difference)]  # older: first in line
    [same] = submit()
    got = _claim(sessions, [a])
    assert [image.id for image in got.images] == [a, same]
    assert {row.status for row in _rows(sessions, others).values()} == {"queued"}


def test_a_lora_batch_tops_up_with_the_same_set_and_weights_only(sessions, submit) -> None:
    ink = (("b" * 64, 0.8),)
    [a] = submit(loras=ink)
    [other_weight] = submit(loras=(("b" * 64, 0.5),), age=10)
    [same] = submit(loras=ink)
    got = _claim(sessions, [a])
    assert got.topped_up == [same]
    assert _rows(sessions, [other_weight])[other_weight].status == "queued"


def test_higher_priority_work_goes_first_then_the_oldest(sessions, submit) -> None:
    [own] = submit(campaign_priority=6)
    low = submit(2, campaign_priority=9, age=300)  # oldest, lowest priority
    campaign = submit(2, campaign_priority=6, age=200)
    urgent = submit(2, campaign_priority=2, age=100)
    interactive_new, interactive_old = submit(1, age=1), submit(1, age=50)
    got = _claim(sessions, [own], chunk=6)
    # plain submissions (priority 0) first, oldest first; then priority 2; never the priority 9 work
    assert got.topped_up == interactive_old + interactive_new + urgent + campaign[:1]
    assert {row.status for row in _rows(sessions, low).values()} == {"queued"}


def test_at_equal_priority_interactive_jobs_go_before_a_campaign(sessions, submit) -> None:
    [own] = submit(campaign_priority=0)
    campaign = submit(3, campaign_priority=0, age=100)  # same priority, older
    interactive = submit(1, age=1)
    got = _claim(sessions, [own], chunk=3)
    assert got.topped_up == interactive + campaign[:1]


def test_only_queued_images_are_topped_up(sessions, submit) -> None:
    [a] = submit()
    [paused] = submit(age=5)
    [canceled] = submit(age=5)
    [held] = submit(age=5)
    lifecycle.pause(sessions, ImageRecord.id == paused)
    lifecycle.cancel(sessions, ImageRecord.id == canceled, reason="by the user")
    holder = _claim(sessions, [held], chunk=None, worker="w9")
    got = _claim(sessions, [a])
    assert got.topped_up == []
    rows = _rows(sessions, [paused, canceled, held])
    assert (rows[paused].status, rows[canceled].status, rows[held].claim_token) == ("paused", "canceled", holder.token)


def test_a_topped_up_image_past_its_attempts_is_given_up(sessions, submit) -> None:
    [a], [tired] = submit(), submit()
    with sessions.begin() as session:
        session.execute(update(ImageRecord).where(ImageRecord.id == tired).values(attempts=3))
    got = _claim(sessions, [a], max_attempts=3)
    assert [image.id for image in got.images] == [a]
    assert got.given_up == [tired] and got.topped_up == []
    assert _rows(sessions, [tired])[tired].status == "failed"


# -- through the worker's render path, on the tiny model ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from workers.diffusion.pipeline import load_pipeline

    return load_pipeline("tiny", str(tiny_model), models_dir=tiny_model.parent, device="cpu")


def _worker(settings: Settings, sessions, storage, model, **options):
    from workers.context import WorkerContext

    ctx = WorkerContext(
        settings=Settings(data_dir=settings.data_dir, max_batch_size=8, upload_retries=0, **options),
        model_name="tiny", device="cpu",
    )
    ctx._sessions, ctx._storage, ctx._model = sessions, storage, model
    return ctx


def _run(ctx, image_ids: list[str], published: list) -> dict:
    from workers import tasks

    app = SimpleNamespace(conf=SimpleNamespace(worker_send_task_events=False))
    task = SimpleNamespace(request=SimpleNamespace(hostname="cpu0@test", retries=0, id=str(uuid.uuid4())), app=app)
    outcome = tasks.run_render(task, ctx, image_ids, "tiny")
    assert ctx.finisher.wait(timeout=60)
    return outcome


def _pixels(data: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("top_up", [True, False], ids=["top-up", "off"])
def test_a_worker_renders_two_jobs_in_one_batch_each_as_alone(
    sessions, settings, submit, memory_storage, tiny, monkeypatch, top_up: bool
) -> None:
    from farm.request.spec import ImageSpec
    from workers import tasks
    from workers.diffusion.render import render_batch

    published: list = []
    monkeypatch.setattr(tasks, "publish_images", lambda *a, **k: published.append((a, k)))
    [a], [b] = submit(prompt="a red cube"), submit(prompt="a blue cone, on a green floor")
    ctx = _worker(settings, sessions, memory_storage, tiny, top_up=top_up)
    first = _run(ctx, [a], published)
    second = _run(ctx, [b], published)
    if top_up:
        assert first["rendered"] == 2 and first["chunks"] == 1  # one GPU batch of both jobs
        assert second == {"rendered": 0, "held_elsewhere": 0}  # b's own message: nothing left to do
    else:  # the behaviour before: one task, one job
        assert first["rendered"] == 1 and second["rendered"] == 1
    assert published == []
    rows = _rows(sessions, [a, b])
    assert {row.status for row in rows.values()} == {"succeeded"}
    assert {row.info["batch_size"] for row in rows.values()} == ({2} if top_up else {1})
    assert {row.attempts for row in rows.values()} == {1}
    # each image is the image it is alone: its own seed and generator
    for image_id in (a, b):
        row = rows[image_id]
        alone = render_batch(tiny, [ImageSpec.from_params(row.params)], base_scheduler_config=tiny.scheduler_config)
        stored = _pixels(memory_storage.get(image_key(row.submission_id, row.id)))
        expected = np.asarray(alone.images[0].image.convert("RGB"), dtype=np.int16)
        assert np.abs(stored - expected).max() <= 1


def test_a_large_campaign_is_looked_through_in_a_bounded_window_and_nothing_lower_jumps_it(
    sessions, submit, monkeypatch
) -> None:
    """Each campaign is read through at most TOP_UP_CAMPAIGN_SCAN queued rows (a claim's cost stays
    bounded); a campaign whose window may hide more of the key ends the search, so lower-priority
    work never goes ahead of higher-priority work it did not look at."""
    monkeypatch.setattr(cross_job, "TOP_UP_CAMPAIGN_SCAN", 3)
    [own] = submit()
    urgent_other_key = submit(3, campaign_priority=1, age=100, steps=5)
    low_same_key = submit(3, campaign_priority=8, age=100)
    got = _claim(sessions, [own])
    assert got.topped_up == []
    assert {row.status for row in _rows(sessions, urgent_other_key + low_same_key).values()} == {"queued"}

    monkeypatch.setattr(cross_job, "TOP_UP_CAMPAIGN_SCAN", 100)  # the whole campaign seen: none of the key
    [own] = submit()
    assert _claim(sessions, [own]).topped_up == low_same_key

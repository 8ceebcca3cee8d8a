"""Claims on embedded SQLite: each image is rendered and recorded once, whatever the deliveries do.

Each test gets its own database (a copy of the session's migrated one, through ``farm_settings``)
and submits with the shared request builder (``make_request``).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from farm import lifecycle
from farm.db.tables import ImageRecord
from farm.request.spec import check_request
from farm.settings import Settings

LEASE = 30.0
TINY_LEASE = 0.05


@pytest.fixture
def settings(farm_settings: Settings) -> Settings:
    return Settings(data_dir=farm_settings.data_dir, max_batch_size=8)




@pytest.fixture
def submit(sessions, settings, make_request) -> Callable[..., tuple[str, list[str]]]:
    """``submit(num_images=3, **fields)``: record a request (seeds 1, 2, …) as the client does;
    returns the submission id and the image ids in order."""

    def submit(num_images: int = 3, **fields) -> tuple[str, list[str]]:
        specs = check_request(make_request(num_images=num_images, **fields), settings).images
        submission_id, batches = lifecycle.record(sessions, specs, num_requests=1, settings=settings)
        return submission_id, [image_id for batch in batches for image_id in batch.image_ids]

    return submit


def _rows(sessions: sessionmaker[Session], ids: list[str]) -> list[ImageRecord]:
    with sessions() as session:
        by_id = {row.id: row for row in session.scalars(select(ImageRecord).where(ImageRecord.id.in_(ids)))}
    return [by_id[image_id] for image_id in ids]


def _claim(sessions, ids, *, worker="w1", lease=LEASE, max_attempts=3) -> lifecycle.Claim:
    return lifecycle.claim(sessions, ids, worker=worker, lease_seconds=lease, max_attempts=max_attempts)


def test_claim_takes_queued_images(sessions, submit) -> None:
    _, ids = submit()
    got = _claim(sessions, ids, worker="gpu0@a")
    assert [image.id for image in got.images] == ids  # in submission order
    assert got.held_elsewhere == [] and got.given_up == []
    for row in _rows(sessions, ids):
        assert row.status == "running"
        assert row.claim_token == got.token
        assert row.worker == "gpu0@a"
        assert row.attempts == 1
        assert row.started_at is not None
        remaining = (row.lease_expires_at - row.started_at).total_seconds()
        assert remaining == pytest.approx(LEASE, abs=1)
    # the claimed rows carry what the worker renders
    assert sorted(image.seed for image in got.images) == [1, 2, 3]


def test_second_claim_gets_nothing_and_knows_how_long_to_wait(sessions, submit) -> None:
    _, ids = submit()
    first = _claim(sessions, ids, worker="w1")
    second = _claim(sessions, ids, worker="w2")
    assert second.images == []
    assert sorted(second.held_elsewhere) == sorted(ids)
    assert second.wait_seconds == pytest.approx(LEASE, abs=2)
    assert second.token != first.token
    assert {row.claim_token for row in _rows(sessions, ids)} == {first.token}
    assert {row.worker for row in _rows(sessions, ids)} == {"w1"}
    assert {row.attempts for row in _rows(sessions, ids)} == {1}


def test_racing_claims_never_share_an_image(sessions, submit) -> None:
    _, ids = submit(num_images=8)
    results: list[lifecycle.Claim] = []
    barrier = threading.Barrier(4)

    def run(name: str) -> None:
        barrier.wait()
        results.append(_claim(sessions, ids, worker=name))

    threads = [threading.Thread(target=run, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    taken = [image.id for result in results for image in result.images]
    assert sorted(taken) == sorted(ids), "every image claimed exactly once"
    assert {row.attempts for row in _rows(sessions, ids)} == {1}


def test_expired_lease_is_taken_over(sessions, submit) -> None:
    _, ids = submit()
    dead = _claim(sessions, ids, worker="dead", lease=TINY_LEASE)
    time.sleep(TINY_LEASE * 3)
    alive = _claim(sessions, ids, worker="alive")
    assert [image.id for image in alive.images] == ids
    assert alive.held_elsewhere == []
    for row in _rows(sessions, ids):
        assert row.attempts == 2
        assert row.worker == "alive"
        assert row.claim_token == alive.token

    # the dead worker comes back: its heartbeat finds nothing, its results are refused
    assert lifecycle.heartbeat(sessions, dead.token, LEASE) == 0
    assert lifecycle.record_success(sessions, dead.token, ids[0], storage_key="images/stale.png") is False
    assert lifecycle.record_failure(sessions, dead.token, ids, "stale failure") == 0
    row = _rows(sessions, ids)[0]
    assert row.status == "running"
    assert row.storage_key is None and row.error is None

    assert lifecycle.record_success(sessions, alive.token, ids[0], storage_key="images/good.png", gpu_seconds=1.5)
    row = _rows(sessions, ids)[0]
    assert row.status == "succeeded"
    assert row.storage_key == "images/good.png"
    assert row.gpu_seconds == 1.5
    assert row.lease_expires_at is None and row.finished_at is not None


def test_live_lease_is_not_taken_over(sessions, submit) -> None:
    _, ids = submit()
    first = _claim(sessions, ids, lease=TINY_LEASE)
    lifecycle.heartbeat(sessions, first.token, LEASE)  # renewed before it ran out
    time.sleep(TINY_LEASE * 3)
    assert _claim(sessions, ids, worker="w2").images == []


def test_record_success_twice_records_once(sessions, submit) -> None:
    _, ids = submit(num_images=1)
    got = _claim(sessions, ids)
    assert lifecycle.record_success(sessions, got.token, ids[0], storage_key="images/a.png") is True
    finished_at = _rows(sessions, ids)[0].finished_at
    assert lifecycle.record_success(sessions, got.token, ids[0], storage_key="images/b.png") is False
    row = _rows(sessions, ids)[0]
    assert row.storage_key == "images/a.png"
    assert row.finished_at == finished_at
    # a finished image is not claimed again either
    assert _claim(sessions, ids, worker="w2").images == []


def test_heartbeat_renews_and_counts_held_images(sessions, submit) -> None:
    _, ids = submit()
    got = _claim(sessions, ids, lease=5)
    before = _rows(sessions, ids)[0].lease_expires_at
    assert lifecycle.heartbeat(sessions, got.token, LEASE) == 3
    after = _rows(sessions, ids)[0].lease_expires_at
    assert (after - before).total_seconds() == pytest.approx(LEASE - 5, abs=1)
    lifecycle.record_success(sessions, got.token, ids[0], storage_key="images/x.png")
    assert lifecycle.heartbeat(sessions, got.token, LEASE) == 2


def test_canceled_images_are_never_claimed(sessions, submit) -> None:
    submission_id, ids = submit()
    assert lifecycle.cancel(sessions, ImageRecord.submission_id == submission_id, reason="canceled by the user") == 3
    got = _claim(sessions, ids)
    assert got.images == [] and got.held_elsewhere == []
    assert {row.status for row in _rows(sessions, ids)} == {"canceled"}
    assert {row.attempts for row in _rows(sessions, ids)} == {0}


def test_cancel_while_running_wins_over_the_worker(sessions, submit) -> None:
    submission_id, ids = submit()
    got = _claim(sessions, ids)
    assert lifecycle.heartbeat(sessions, got.token, LEASE) == 3
    assert lifecycle.cancel(sessions, ImageRecord.submission_id == submission_id, reason="canceled by the user") == 3
    assert lifecycle.heartbeat(sessions, got.token, LEASE) == 0  # the worker stops at its next step
    assert lifecycle.record_success(sessions, got.token, ids[0], storage_key="images/late.png") is False
    assert lifecycle.record_failure(sessions, got.token, ids, "late failure") == 0
    assert lifecycle.release(sessions, got.token) == 0
    for row in _rows(sessions, ids):
        assert row.status == "canceled"
        assert row.storage_key is None
        assert row.error == "canceled by the user"
    with sessions() as session:
        assert lifecycle.submission_counts(session, submission_id)["canceled"] == 3


def test_cancel_keeps_finished_images(sessions, submit) -> None:
    submission_id, ids = submit()
    got = _claim(sessions, ids)
    lifecycle.record_success(sessions, got.token, ids[0], storage_key="images/done.png")
    assert lifecycle.cancel(sessions, ImageRecord.submission_id == submission_id, reason="canceled by the user") == 2
    assert [row.status for row in _rows(sessions, ids)] == ["succeeded", "canceled", "canceled"]
    assert lifecycle.heartbeat(sessions, got.token, LEASE) == 0


def test_release_requeues_without_counting_the_attempt(sessions, submit) -> None:
    _, ids = submit()
    got = _claim(sessions, ids)
    lifecycle.record_success(sessions, got.token, ids[0], storage_key="images/done.png")
    assert lifecycle.release(sessions, got.token, note="storage unreachable") == 2
    rows = _rows(sessions, ids)
    assert rows[0].status == "succeeded"
    for row in rows[1:]:
        assert row.status == "queued"
        assert row.attempts == 0
        assert row.claim_token is None and row.lease_expires_at is None
    again = _claim(sessions, ids, worker="w2")
    assert [image.id for image in again.images] == ids[1:]
    assert {row.attempts for row in _rows(sessions, ids[1:])} == {1}
    # the released claim's token no longer records anything
    assert lifecycle.record_success(sessions, got.token, ids[1], storage_key="images/old.png") is False


def test_release_of_some_images_leaves_the_rest_of_the_claim_rendering(sessions, submit) -> None:
    _, ids = submit(num_images=4)
    got = _claim(sessions, ids)
    assert lifecycle.release(sessions, got.token, note="upload failed", image_ids=ids[:2]) == 2
    assert [row.status for row in _rows(sessions, ids)] == ["queued", "queued", "running", "running"]
    assert lifecycle.record_success(sessions, got.token, ids[2], storage_key="images/2.png") is True
    assert lifecycle.heartbeat(sessions, got.token, LEASE) == 1


def test_record_failure_marks_failed_with_the_error(sessions, submit) -> None:
    _, ids = submit()
    got = _claim(sessions, ids)
    assert lifecycle.record_failure(sessions, got.token, ids[:2], "CUDA out of memory") == 2
    rows = _rows(sessions, ids)
    assert [row.status for row in rows] == ["failed", "failed", "running"]
    assert rows[0].error == "CUDA out of memory"


def test_too_many_attempts_gives_up(sessions, submit) -> None:
    _, ids = submit(num_images=2)
    for attempt in range(1, 4):  # each worker dies holding the images
        got = _claim(sessions, ids, worker=f"w{attempt}", lease=TINY_LEASE, max_attempts=3)
        assert len(got.images) == 2 and got.given_up == []
        time.sleep(TINY_LEASE * 3)
    last = _claim(sessions, ids, worker="w4", max_attempts=3)
    assert last.images == []
    assert sorted(last.given_up) == sorted(ids)
    for row in _rows(sessions, ids):
        assert row.status == "failed"
        assert "3 attempts" in row.error
        assert row.finished_at is not None
    assert _claim(sessions, ids, worker="w5", max_attempts=3).images == []


def test_take_back_expired_requeues_only_expired_once(sessions, submit) -> None:
    _, dead_ids = submit(num_images=3)
    _, other_dead = submit(num_images=2, model=None, steps=10)
    _, live_ids = submit(num_images=2)
    _, queued_ids = submit(num_images=1)

    dead = _claim(sessions, dead_ids, lease=TINY_LEASE)
    _claim(sessions, other_dead, lease=TINY_LEASE)
    live = _claim(sessions, live_ids, lease=LEASE)
    time.sleep(TINY_LEASE * 3)

    taken = lifecycle.take_back_expired(sessions)
    assert sorted(taken) == sorted(dead_ids + other_dead)

    for row in _rows(sessions, dead_ids + other_dead):
        assert row.status == "queued"
        assert row.claim_token is None
        assert row.attempts == 1  # the dead worker's attempt counts
    assert {row.status for row in _rows(sessions, live_ids)} == {"running"}
    assert {row.claim_token for row in _rows(sessions, live_ids)} == {live.token}
    assert {row.status for row in _rows(sessions, queued_ids)} == {"queued"}

    assert lifecycle.take_back_expired(sessions) == []
    assert lifecycle.heartbeat(sessions, dead.token, LEASE) == 0

    retaken = _claim(sessions, dead_ids, worker="w2")
    assert [image.id for image in retaken.images] == dead_ids
    assert {row.attempts for row in _rows(sessions, dead_ids)} == {2}


def test_take_back_expired_respects_grace(sessions, submit) -> None:
    _, ids = submit()
    _claim(sessions, ids, lease=TINY_LEASE)
    time.sleep(TINY_LEASE * 3)
    assert lifecycle.take_back_expired(sessions, grace_seconds=60) == []
    assert {row.status for row in _rows(sessions, ids)} == {"running"}
    assert len(lifecycle.take_back_expired(sessions)) == 3


def test_images_that_could_not_be_stored_fail_after_max_attempts_with_the_reason(sessions, submit) -> None:
    _, ids = submit(num_images=1)
    note = "queued again after StorageError: S3 put failed: AccessDenied"
    for worker in ("w1", "w2", "w3"):
        got = _claim(sessions, ids, worker=worker, max_attempts=3)
        assert [image.id for image in got.images] == ids
        assert lifecycle.release(sessions, got.token, note=note, image_ids=ids, count_attempt=True) == 1
    last = _claim(sessions, ids, worker="w4", max_attempts=3)
    assert last.images == [] and last.given_up == ids
    [row] = _rows(sessions, ids)
    assert row.status == "failed" and row.error == f"gave up after 3 attempts; the last one: {note}"


def check_record_success_many(sessions, ids: list[str]) -> None:
    """Shared with tests/integration/test_record_many_pg.py (PostgreSQL: one UPDATE … FROM VALUES)."""
    got = _claim(sessions, ids)
    other = _claim(sessions, [ids[3]], worker="w2")  # nothing: held by the first claim
    assert other.images == []
    lifecycle.cancel(sessions, ImageRecord.id == ids[2], reason="canceled meanwhile")
    info = {"model_hash": "abc", "batch_size": 4}
    rows = [
        (ids[0], {"storage_key": "images/0.png", "gpu_seconds": 0.5, "prompt_tokens": 7, "prompt_truncated": False,
                  "info": info, "flagged": False, "safety": {"policy": "flag", "scores": {"nsfw": 0.1}}}),
        (ids[1], {"storage_key": None, "gpu_seconds": 0.5, "prompt_tokens": None, "prompt_truncated": None,
                  "info": info, "flagged": True, "safety": {"policy": "drop"}, "filtered": "withheld by the safety checker"}),
        (ids[2], {"storage_key": "images/2.png", "gpu_seconds": 0.5, "prompt_tokens": 7, "prompt_truncated": False,
                  "info": info, "flagged": False, "safety": None}),
        (ids[3], {"storage_key": "images/3.png", "gpu_seconds": 0.25}),  # another set of columns
    ]
    recorded = lifecycle.record_success_many(sessions, got.token, rows)
    assert sorted(recorded) == sorted([ids[0], ids[1], ids[3]])
    a, b, c, d = _rows(sessions, ids[:4])
    assert (a.status, a.storage_key, a.gpu_seconds, a.prompt_tokens, a.info, a.flagged, a.safety["scores"]) == (
        "succeeded", "images/0.png", 0.5, 7, info, False, {"nsfw": 0.1})
    assert a.lease_expires_at is None and a.finished_at is not None and a.error is None
    assert (b.status, b.storage_key, b.flagged, b.error) == ("filtered", None, True, "withheld by the safety checker")
    assert (c.status, c.storage_key, c.error) == ("canceled", None, "canceled meanwhile")  # never overwritten
    assert (d.status, d.storage_key, d.gpu_seconds, d.info) == ("succeeded", "images/3.png", 0.25, None)
    # twice: nothing recorded again
    assert lifecycle.record_success_many(sessions, got.token, rows[:1]) == []
    assert lifecycle.record_success_many(sessions, got.token, []) == []


def test_record_success_many_records_only_what_the_claim_holds(sessions, submit) -> None:
    _, ids = submit(num_images=4)
    check_record_success_many(sessions, ids)


def test_record_success_many_adopts_like_record_success(sessions, submit) -> None:
    _, ids = submit(num_images=2)
    old = _claim(sessions, ids)
    lifecycle.release(sessions, old.token)  # queued again, nobody rendered it since
    assert lifecycle.record_success_many(sessions, old.token, [(ids[0], {"storage_key": "images/a.png"})]) == []
    assert lifecycle.record_success_many(sessions, old.token, [(ids[0], {"storage_key": "images/a.png"})], adopt=True) == [ids[0]]
    other = _claim(sessions, [ids[1]], worker="w2")  # rendered again elsewhere: never adopted
    assert lifecycle.record_success_many(sessions, old.token, [(ids[1], {"storage_key": "images/b.png"})], adopt=True) == []
    assert _rows(sessions, [ids[1]])[0].claim_token == other.token

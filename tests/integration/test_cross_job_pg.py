"""Cross-job batching on real PostgreSQL: top-up claims lock their candidates ``FOR UPDATE SKIP
LOCKED``, so concurrent claimers never take the same image and never wait on each other.

Each test records its images under a model name of its own, so other tests' rows in the session's
database never match its batch key.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from datetime import timedelta
from typing import Iterator

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from farm import db, lifecycle
from farm.db.tables import CampaignRecord, ImageRecord, utcnow
from farm.settings import Settings

pytestmark = pytest.mark.integration

LEASE = 60.0


@pytest.fixture(scope="module")
def sessions(pg_database: str, tmp_path_factory) -> Iterator[sessionmaker[Session]]:
    engine = db.make_engine(pg_database)
    db.ensure_schema(engine, auto_upgrade=True)
    yield db.make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, max_batch_size=8)


def _submit(sessions, settings, make_spec, model: str, n: int = 1, *, campaign_priority: int | None = None,
            age: float = 0, seed: int = 1) -> list[str]:
    specs = [make_spec(model=model, seed=seed + i) for i in range(n)]
    campaign_id = None
    if campaign_priority is not None:
        campaign_id = str(uuid.uuid4())
        with sessions.begin() as session:
            session.add(CampaignRecord(id=campaign_id, name=f"xj-{campaign_id}", priority=campaign_priority))
    _, batches = lifecycle.record(sessions, specs, num_requests=1, settings=settings, campaign_id=campaign_id)
    ids = [image_id for batch in batches for image_id in batch.image_ids]
    if age:
        with sessions.begin() as session:
            session.execute(
                update(ImageRecord).where(ImageRecord.id.in_(ids)).values(queued_at=utcnow() - timedelta(seconds=age))
            )
    return ids


def test_concurrent_top_up_claims_never_share_an_image(sessions, settings, make_spec) -> None:
    model = f"xj-{uuid.uuid4().hex[:8]}"
    tasks = [_submit(sessions, settings, make_spec, model, seed=i) for i in range(240)]  # 240 single-image jobs
    pending = list(tasks)
    lock = threading.Lock()
    claims: list[lifecycle.Claim] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def claimer(name: str) -> None:
        barrier.wait()
        try:
            while True:
                with lock:
                    if not pending:
                        return
                    ids = pending.pop()
                got = lifecycle.claim(sessions, ids, worker=name, lease_seconds=LEASE, max_attempts=3,
                                      top_up=lambda width, height: 8)
                with lock:
                    claims.append(got)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    taken = Counter(image.id for got in claims for image in got.images)
    everything = {image_id for ids in tasks for image_id in ids}
    assert set(taken) == everything and set(taken.values()) == {1}, "every image claimed exactly once"
    with sessions() as session:
        rows = session.execute(
            select(ImageRecord.id, ImageRecord.claim_token, ImageRecord.attempts).where(ImageRecord.model == model)
        ).all()
    token_of = {image.id: got.token for got in claims for image in got.images}
    assert all(token == token_of[image_id] and attempts == 1 for image_id, token, attempts in rows)
    sizes = [len(got.images) for got in claims if got.images]
    # cross-job batching did its job: most claims are full chunks, far fewer claims than jobs
    assert max(sizes) == 8 and len(sizes) <= 240 // 2, sizes


def test_priority_order_on_postgresql(sessions, settings, make_spec) -> None:
    model = f"xj-{uuid.uuid4().hex[:8]}"
    [own] = _submit(sessions, settings, make_spec, model, campaign_priority=6)
    low = _submit(sessions, settings, make_spec, model, 3, campaign_priority=9, age=300)
    same_priority_campaign = _submit(sessions, settings, make_spec, model, 2, campaign_priority=0, age=200)
    interactive = _submit(sessions, settings, make_spec, model, 2, age=5)
    got = lifecycle.claim(sessions, [own], worker="w1", lease_seconds=LEASE, max_attempts=3, top_up=lambda w, h: 5)
    assert got.topped_up == interactive + same_priority_campaign
    with sessions() as session:
        statuses = set(session.scalars(select(ImageRecord.status).where(ImageRecord.id.in_(low))))
    assert statuses == {"queued"}


def test_a_claimer_skips_rows_another_transaction_holds(sessions, settings, make_spec) -> None:
    """A candidate row locked by another claim's transaction is passed over at once (SKIP LOCKED),
    not waited for: the claim tops up with the next ones."""
    model = f"xj-{uuid.uuid4().hex[:8]}"
    [own] = _submit(sessions, settings, make_spec, model)
    [locked] = _submit(sessions, settings, make_spec, model, age=100)
    [free] = _submit(sessions, settings, make_spec, model, age=50)
    with sessions.begin() as holder:
        holder.execute(select(ImageRecord.id).where(ImageRecord.id == locked).with_for_update())
        got = lifecycle.claim(sessions, [own], worker="w1", lease_seconds=LEASE, max_attempts=3, top_up=lambda w, h: 3)
        assert got.topped_up == [free]
    with sessions() as session:
        assert session.scalar(select(ImageRecord.status).where(ImageRecord.id == locked)) == "queued"

"""``lifecycle.record_success_many`` on real PostgreSQL: one ``UPDATE … FROM (VALUES …) RETURNING``
per chunk, with the same guards as ``record_success`` (the SQLite twin is in tests/unit/test_lifecycle.py)."""

from __future__ import annotations

from typing import Iterator

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from farm import db, lifecycle
from farm.request.spec import check_request
from farm.settings import Settings
from tests.unit.test_lifecycle import check_record_success_many

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(pg_database: str):
    engine = db.make_engine(pg_database)
    db.ensure_schema(engine, auto_upgrade=True)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine) -> Iterator[sessionmaker[Session]]:
    yield db.make_sessionmaker(engine)


def _submit(sessions, tmp_path, make_request, n: int) -> list[str]:
    settings = Settings(data_dir=tmp_path, max_batch_size=8)
    specs = check_request(make_request(num_images=n), settings).images
    _, batches = lifecycle.record(sessions, specs, num_requests=1, settings=settings)
    return [image_id for batch in batches for image_id in batch.image_ids]


def test_record_success_many_on_postgresql(sessions, tmp_path, make_request) -> None:
    check_record_success_many(sessions, _submit(sessions, tmp_path, make_request, 4))


def test_one_statement_per_chunk(sessions, engine, tmp_path, make_request) -> None:
    ids = _submit(sessions, tmp_path, make_request, 8)
    claim = lifecycle.claim(sessions, ids, worker="w", lease_seconds=60, max_attempts=3)
    statements: list[str] = []
    listener = lambda _c, _cur, statement, *_a: statements.append(statement.split(None, 1)[0].upper())  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        recorded = lifecycle.record_success_many(sessions, claim.token, [
            (i, {"storage_key": f"images/{i}.png", "gpu_seconds": 0.1, "prompt_tokens": 3, "prompt_truncated": False,
                 "model_path": "/m", "info": {"n": n}, "flagged": None, "safety": None})
            for n, i in enumerate(ids)
        ])
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert sorted(recorded) == sorted(ids)
    assert statements.count("UPDATE") == 1, statements


def test_a_claim_of_a_whole_task_is_one_statement(sessions, engine, tmp_path, make_request) -> None:
    ids = _submit(sessions, tmp_path, make_request, 8)
    statements: list[str] = []
    listener = lambda _c, _cur, statement, *_a: statements.append(statement.split(None, 1)[0].upper())  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        claim = lifecycle.claim(sessions, ids, worker="w", lease_seconds=60, max_attempts=3)
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert [image.id for image in claim.images] == ids and claim.held_elsewhere == []
    assert statements == ["UPDATE"]  # UPDATE … RETURNING; nobody else can hold what this claim took whole

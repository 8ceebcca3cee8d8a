"""The Alembic migrations build exactly the schema the records describe (what `alembic check` verifies),
and a server database that is behind says how to fix it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text

from farm import db
from farm.errors import SchemaOutOfDate
from farm.db.tables import Base

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _differences(engine: Engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return compare_metadata(context, Base.metadata)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    yield engine
    engine.dispose()


def test_sqlite_migrations_match_the_records(sqlite_engine: Engine) -> None:
    db.upgrade(sqlite_engine)
    assert db.current_revision(sqlite_engine) == db.head_revision()
    assert _differences(sqlite_engine) == []


def test_compare_would_see_a_missing_table(sqlite_engine: Engine) -> None:
    """The comparison above is not vacuous: an empty database differs from the records."""
    assert _differences(sqlite_engine) != []


def test_upgrade_creates_the_tables_and_is_idempotent(sqlite_engine: Engine) -> None:
    db.upgrade(sqlite_engine)
    db.upgrade(sqlite_engine)
    assert {"submissions", "images", "alembic_version"} <= set(inspect(sqlite_engine).get_table_names())
    db.ensure_schema(sqlite_engine, auto_upgrade=False)  # at head: no error


def test_ensure_schema_refuses_an_empty_database(sqlite_engine: Engine) -> None:
    with pytest.raises(SchemaOutOfDate) as caught:
        db.ensure_schema(sqlite_engine, auto_upgrade=False)
    message = str(caught.value)
    assert "`farm db upgrade`" in message
    assert "None" in message  # the database's current revision
    assert repr(db.head_revision()) in message
    assert "images" not in inspect(sqlite_engine).get_table_names(), "nothing was created"


def test_ensure_schema_upgrades_when_allowed(sqlite_engine: Engine) -> None:
    db.ensure_schema(sqlite_engine, auto_upgrade=True)
    assert db.current_revision(sqlite_engine) == db.head_revision()
    assert _differences(sqlite_engine) == []


def test_head_revision_exists() -> None:
    assert db.head_revision()


@pytest.mark.integration
def test_postgresql_migrations_match_the_records() -> None:
    name = f"farm_mig_{uuid.uuid4().hex}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        admin.dispose()
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is needed for integration tests: {exc}")
    engine = db.make_engine(f"postgresql://postgres@127.0.0.1:5432/{name}")  # plain URL: psycopg 3 chosen
    try:
        with pytest.raises(SchemaOutOfDate, match="`farm db upgrade`"):
            db.ensure_schema(engine, auto_upgrade=False)
        db.upgrade(engine)
        assert db.current_revision(engine) == db.head_revision()
        assert _differences(engine) == []
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

"""Alembic environment. ``farm db upgrade`` passes the engine in; the plain ``alembic`` command builds
one from the settings (``FARM_DATABASE_URL``, or the embedded SQLite default)."""

from __future__ import annotations

from alembic import context

from farm.db.tables import Base

config = context.config
target_metadata = Base.metadata


def _engine():
    engine = config.attributes.get("engine")
    if engine is None:
        from farm.db import make_engine
        from farm.settings import Settings

        engine = make_engine(config.get_main_option("sqlalchemy.url") or Settings().database)
    return engine


def run_migrations_offline() -> None:
    context.configure(
        url=str(_engine().url), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

"""The database: engine and migrations (:mod:`farm.db.engine`) and the tables (:mod:`farm.db.tables`)."""

from farm.db.engine import (
    alembic_config,
    current_revision,
    ensure_schema,
    head_revision,
    make_engine,
    make_sessionmaker,
    migrations_dir,
    upgrade,
)

__all__ = [
    "alembic_config",
    "current_revision",
    "ensure_schema",
    "head_revision",
    "make_engine",
    "make_sessionmaker",
    "migrations_dir",
    "upgrade",
]

"""What the light side's parts share, built once from the settings and handed down: the settings,
the database sessions, the model catalogue, storage and the Celery app (the last two made on first
use, so a command that needs neither never connects to them)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from farm import db
from farm.catalogue import Catalogue
from farm.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

    from farm.storage import Storage

__all__ = ["Services"]


@dataclass(frozen=True, eq=False)
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]

    @classmethod
    def open(cls, settings: Settings) -> "Services":
        """Connect to the database and check its schema (an embedded SQLite one is brought up to date)."""
        engine = db.make_engine(settings.database)
        db.ensure_schema(engine, auto_upgrade=engine.dialect.name == "sqlite")
        return cls(settings=settings, engine=engine, sessions=db.make_sessionmaker(engine))

    @cached_property
    def catalogue(self) -> Catalogue:
        return Catalogue(self.settings)

    @cached_property
    def storage(self) -> "Storage":
        from farm.storage import open_storage

        return open_storage(self.settings)

    @cached_property
    def celery(self) -> "Celery":
        from farm.dispatch.celery_app import make_celery

        return make_celery(self.settings)

    def close(self) -> None:
        self.engine.dispose()

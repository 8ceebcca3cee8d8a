"""Engine, sessions and migrations. The schema belongs to Alembic (``alembic/``), never to create_all."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from farm.errors import ConfigError, SchemaOutOfDate
from farm.settings import redact


def shown_url(engine_or_url) -> str:
    """A database URL as it may be shown: its password replaced by ``***``."""
    url = getattr(engine_or_url, "url", engine_or_url)
    try:
        return redact(make_url(url).render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - not parseable: show nothing of it
        return "(an unparseable URL)"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys, as several processes share it.

    A URL that cannot be used is a :class:`~farm.errors.ConfigError` that shows it without its password.
    """
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - ArgumentError, ValueError…: the text may hold a password, show none of it
        raise ConfigError(
            "FARM_DATABASE_URL is not a database URL (e.g. postgresql+psycopg://user:password@host/db, or "
            "sqlite:///path/farm.db)"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"cannot create the folder of the SQLite database {str(folder)!r} "
                    f"({getattr(exc, 'strerror', None) or exc}): check FARM_DATA_DIR or FARM_DATABASE_URL"
                ) from None
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        return create_engine(parsed, pool_pre_ping=True)
    except Exception as exc:  # noqa: BLE001 - bad driver names and the like
        raise ConfigError(f"cannot use database URL {shown_url(parsed)!r}: {redact(str(exc))}") from None


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """The Alembic scripts: packaged inside the wheel, or ``alembic/`` beside ``farm/`` in a checkout."""
    packaged = Path(__file__).resolve().parent.parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "alembic"


def alembic_config(engine: Engine):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (what ``farm db upgrade`` does)."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    config = alembic_config(None)  # type: ignore[arg-type]
    return ScriptDirectory.from_config(config).get_current_head()


def ensure_schema(engine: Engine, *, auto_upgrade: bool) -> None:
    """Check the schema is at head; on an embedded SQLite database, bring it there.

    On a server database the schema is changed only by ``farm db upgrade``, on purpose. A database
    that cannot be reached is a :class:`~farm.errors.ConfigError` naming it (without its password).
    """
    try:
        revision = current_revision(engine)
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DatabaseError) as exc:
        reason = redact(str(getattr(exc, "orig", None) or exc)).strip().splitlines()
        raise ConfigError(
            f"cannot reach the database at {shown_url(engine)} ({reason[0] if reason else type(exc).__name__}): "
            "check FARM_DATABASE_URL and that the server is up"
        ) from None
    if revision == head_revision():
        return
    if auto_upgrade:
        upgrade(engine)
        return
    raise SchemaOutOfDate(
        f"the database at {shown_url(engine)} is at revision "
        f"{revision!r}, this code needs {head_revision()!r}: run `farm db upgrade`"
    )

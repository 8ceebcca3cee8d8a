"""Unit fixtures: no subprocess, no service. The shared ones (``tiny_model``, ``make_spec``,
``make_request``, ``memory_storage``, ``farm_settings``, ``embedded_farm``) are in ``tests/conftest.py``.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest


@pytest.fixture
def farm_cli(farm_settings) -> Callable:
    """``farm_cli(*args, **env)``: run the ``farm`` command in this process (click's ``CliRunner``)
    against the embedded farm of ``farm_settings`` (``FARM_DATA_DIR`` is its data folder; other
    ``FARM_*`` variables only as given, e.g. ``FARM_MODELS="…"``). Returns click's ``Result``:
    ``exit_code``, ``stdout``, ``stderr``, ``exception``. The same code as ``python -m farm``, less
    the interpreter start (tests/integration runs the real process)."""
    from click.testing import CliRunner

    from farm.cli.main import main

    def run(*args: object, **env: str):
        return CliRunner().invoke(main, [str(arg) for arg in args], env={"FARM_DATA_DIR": str(farm_settings.data_dir), **env})

    return run


@pytest.fixture
def sessions(farm_settings) -> Iterator:
    """Database sessions on ``farm_settings``' database (already at head): for tests of
    ``farm.lifecycle`` and the claims, without a ``Farm``."""
    from farm import db

    engine = db.make_engine(farm_settings.database)
    db.ensure_schema(engine, auto_upgrade=False)
    yield db.make_sessionmaker(engine)
    engine.dispose()

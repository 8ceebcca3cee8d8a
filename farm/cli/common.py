"""What every ``farm`` command shares: settings read from FARM_*, the Farm they act on, and errors
as one clear line on stderr with an exit code (:data:`EXIT_FAILED`, :data:`EXIT_ERROR`).

Kept apart from ``farm.cli.main`` so the command groups in their own modules (``farm.cli.campaign``,
``farm.cli.lora``) use it without importing ``farm.cli.main``, which imports them.
"""

from __future__ import annotations

import functools
import sys

import click
import pydantic

from farm.errors import FarmError
from farm.settings import Settings

EXIT_FAILED = 1  # the work ran and did not (all) succeed
EXIT_ERROR = 2  # the command could not do what was asked


def load_settings() -> Settings:
    try:
        return Settings()
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        variable = "FARM_" + "__".join(str(p) for p in first["loc"]).upper()
        raise click.ClickException(f"bad setting {variable}: {first['msg']}") from None


def handles_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FarmError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper


def open_farm():
    from farm.client import Farm

    return Farm(load_settings())

"""What every ``farm`` command shares: settings read from FARM_*, the Farm they act on, and the one
place errors become a line on stderr and an exit code.

Exit codes: 0 done; :data:`EXIT_FAILED` (1) the work ran and (some of it) failed or is not all
there; :data:`EXIT_ERROR` (2) bad usage, input or configuration (nothing was done).
"""

from __future__ import annotations

import click

from farm.errors import FarmError
from farm.settings import Settings, redact

EXIT_FAILED = 1  # the work ran and did not (all) succeed
EXIT_ERROR = 2  # the command could not do what was asked: bad usage, input or configuration


class FarmCommands(click.Group):
    """The root ``farm`` group: every :class:`~farm.errors.FarmError` raised by any command becomes
    one ``error: …`` line and exit code 2 here, and nowhere else."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FarmError as exc:
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            ctx.exit(EXIT_ERROR)
        except click.UsageError as exc:  # a bad option or argument: one line too, with where to look
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"error: {_one_line(exc.format_message())}{where}", err=True)
            ctx.exit(EXIT_ERROR)
        except click.ClickException as exc:
            if exc.exit_code == 1:  # click's default for its own errors: they are usage errors here
                exc.exit_code = EXIT_ERROR
            raise


def _one_line(message: str) -> str:
    """An error message as one line, without any URL's password (``farm.settings.redact``)."""
    return " ".join(redact(message).split("\n")).strip()


def load_settings() -> Settings:
    """The settings from FARM_* (a bad value raises :class:`~farm.errors.ConfigError`)."""
    return Settings()


def open_farm():
    from farm.client import Farm

    return Farm(load_settings())

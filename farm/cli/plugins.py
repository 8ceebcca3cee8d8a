"""Commands that live outside the light side (GPU-side and evaluation commands), found through the
``farm.commands`` entry points and imported only when run, as Celery finds its sub-commands.

An entry point named ``GROUP.COMMAND`` (``model.make-tiny = "workers.commands:make_tiny"``) adds
``farm GROUP COMMAND``; ``farm --help`` lists it without importing its module (or torch).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

import click

ENTRY_POINT_GROUP = "farm.commands"


def plugin_commands(group: str) -> dict[str, EntryPoint]:
    """``{command name: entry point}`` registered for ``farm GROUP``."""
    found = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        prefix, _, name = entry.name.partition(".")
        if prefix == group and name:
            found[name] = entry
    return found


class PluginGroup(click.Group):
    """A click group whose commands also come from ``farm.commands`` entry points, loaded on use."""

    def __init__(self, *args, plugin_group: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.plugin_group = plugin_group

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(plugin_commands(self.plugin_group)))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        entry = plugin_commands(self.plugin_group).get(name)
        if entry is None:
            return None
        try:
            return entry.load()
        except ImportError as exc:  # the worker extra is not installed on this machine
            raise click.ClickException(
                f"`farm {self.plugin_group} {name}` needs the worker side ({exc.name or exc}): "
                "pip install 'farm[worker]' (after torch)"
            ) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # help lines of plugin commands without importing them: the entry point's target is shown
        rows = []
        plugins = plugin_commands(self.plugin_group)
        for name in self.list_commands(ctx):
            command = super().get_command(ctx, name)
            if command is not None:
                rows.append((name, command.get_short_help_str(formatter.width)))
            elif name in plugins:
                rows.append((name, f"(worker side: {plugins[name].value})"))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

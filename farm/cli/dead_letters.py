"""``farm dead-letters``: messages workers could not decode or validate, taken off their queue and
kept (newest 10,000 per queue) with the reason: list them, publish them back after a fix, or delete them.

Wired into ``farm.cli.main`` as a command group of ``farm``. The store and the checks are
``farm.dispatch.dead_letters``; this module only parses options and prints. Errors are
:class:`~farm.errors.FarmError` lines with exit code 2 (``farm.cli.common``).
"""

from __future__ import annotations

import sys

import click

from farm.cli.common import load_settings

LIMIT = click.IntRange(min=1)


def _store():
    from farm.dispatch.dead_letters import DeadLetters

    return DeadLetters(load_settings())


@click.group("dead-letters")
def dead_letters() -> None:
    """Messages workers took off a queue and kept instead of running (a bad content type, body,
    task name or arguments): list, replay after a fix, purge."""


@dead_letters.command("list")
@click.option("--queue", default=None, help="One queue (e.g. farm.shapes); default: every queue.")
@click.option("--limit", type=LIMIT, default=100, show_default=True, help="At most this many, newest first.")
def list_letters(queue, limit):
    """One line per letter, newest first: time, queue, reason, task id."""
    with _store() as store:
        letters = store.letters(queue, limit=limit)
    for letter in letters:
        click.echo(letter.line())
    if not letters:
        click.echo("no dead letters" + (f" in {queue}" if queue else ""), err=True)


@dead_letters.command("counts")
def counts():
    """Messages dead-lettered per queue and reason since the farm began (purge keeps these)."""
    with _store() as store:
        found = store.counts()
    for (queue, code), count in sorted(found.items()):
        click.echo(f"{queue}\t{code}\t{count}")


@dead_letters.command("replay")
@click.option("--queue", default=None, help="One queue; default: every queue.")
@click.option("--limit", type=LIMIT, default=None, help="Only the newest N letters (replayed oldest first).")
@click.option("--force", is_flag=True, help="Also publish messages that still fail the checks.")
def replay(queue, limit, force):
    """Publish letters back to their queue (after a fix: a worker that runs the task, a raised
    batch limit). A message that still fails the checks is kept unless --force."""
    with _store() as store:
        outcomes = store.replay(queue, limit=limit, force=force)
    for outcome in outcomes:
        click.echo(outcome.line())
    done = sum(outcome.replayed for outcome in outcomes)
    click.echo(f"replayed {done} of {len(outcomes)} letter(s); {len(outcomes) - done} kept", err=True)


@dead_letters.command("purge")
@click.option("--queue", default=None, help="One queue; default: every queue.")
@click.option("--yes", is_flag=True, help="Delete without asking (required when not on a terminal).")
def purge(queue, yes):
    """Delete letters (the counts stay)."""
    with _store() as store:
        if not yes:
            count = len(store.letters(queue))
            where = f"of {queue}" if queue else "of every queue"
            if not count:
                click.echo(f"no dead letters {where}")
                return
            if not sys.stdin.isatty():
                raise click.UsageError(f"purge deletes {count} dead letter(s) {where}; add --yes")
            click.confirm(f"delete {count} dead letter(s) {where}?", abort=True)
        deleted = store.purge(queue)
    click.echo(f"deleted {deleted} dead letter(s)")

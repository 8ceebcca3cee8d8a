"""``farm campaign``: submit, follow, steer and export campaigns (many images from a prompt file ×
sweeps, resumable, exported as datasets).

Wired into ``farm.cli.main`` as a command group of ``farm``. The work itself is done by the ``Campaign``
handle that ``Farm.campaign(name)`` returns; this module only parses options and prints.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import click

from farm.cli.common import EXIT_FAILED, open_farm


@click.group()
def campaign() -> None:
    """Campaigns: many images from a prompt file × sweeps, resumable, exported as datasets."""


@campaign.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="The campaign's name (re-submitting to it adds only what is new).")
@click.option("--sweep", "sweeps", multiple=True, help="FIELD=V1,V2,… expanded as a product, e.g. seed=1,2,3.")
@click.option("--dry-run", is_flag=True, help="Print the image count and a GPU-time estimate; submit nothing.")
@click.option("--priority", type=click.IntRange(0, 9), default=None, help="0 first … 9 last (default FARM_CAMPAIGN_PRIORITY).")
def campaign_submit(file, name, sweeps, dry_run, priority):
    """Expand FILE (JSONL, CSV or Parquet of prompts) × sweeps and queue what is new."""
    def show_total(report):
        if not dry_run:
            click.echo(
                f"{report.campaign}: {report.total} image(s) in the input × sweeps; "
                f"estimated GPU time {timedelta(seconds=round(report.estimated_gpu_seconds))}; submitting…",
                err=True,
            )

    with open_farm() as farm:
        report = farm.campaign(name).submit(
            file, sweeps=list(sweeps), dry_run=dry_run, priority=priority, on_total=show_total
        )
        click.echo(str(report))


@campaign.command("status")
@click.argument("name")
def campaign_status(name):
    """Counts by state, images/s, ETA and failures by reason."""
    with open_farm() as farm:
        click.echo(str(farm.campaign(name).status()))


def _campaign_action(verb: str, doc: str):
    def action(name):
        with open_farm() as farm:
            count = getattr(farm.campaign(name), verb.replace("-", "_"))()
        click.echo(f"{name}: {verb} {count} image(s)")

    action.__doc__ = doc
    campaign.command(verb)(click.argument("name")(action))


_campaign_action("pause", "Hold back queued images (running batches finish).")
_campaign_action("resume", "Queue held images again.")
_campaign_action("cancel", "Drop queued and held images; running batches stop at their next step.")
_campaign_action("retry-failed", "Queue failed images again.")


@campaign.command("wait")
@click.argument("name")
@click.option("--timeout", type=float, default=None)
@click.option("--progress/--no-progress", default=True, show_default=True)
def campaign_wait(name, timeout, progress):
    """Wait until nothing is queued or running; exit 0 only if no image failed."""
    with open_farm() as farm:
        final = farm.campaign(name).wait(timeout=timeout, progress=progress)
    click.echo(str(final))
    sys.exit(0 if final.counts["failed"] == 0 else EXIT_FAILED)


@campaign.command("export")
@click.argument("name")
@click.argument("dest")
@click.option("--format", "fmt", type=click.Choice(["imagefolder", "webdataset"]), default="imagefolder", show_default=True)
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Images per WebDataset shard.")
def campaign_export(name, dest, fmt, shard_size):
    """Export finished images to DEST (a folder or s3://bucket/prefix); runs again add only new ones."""
    with open_farm() as farm:
        click.echo(str(farm.campaign(name).export(dest, fmt=fmt, shard_size=shard_size)))


@campaign.command("sheet")
@click.argument("name")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sample", type=int, default=16, show_default=True)
def campaign_sheet(name, out, sample):
    """A contact sheet (grid PNG with prompts) of a sample of the campaign."""
    with open_farm() as farm:
        click.echo(str(farm.campaign(name).contact_sheet(out, sample=sample)))

"""``farm embedding``: add, list and remove textual-inversion embeddings (safetensors files stored
once by sha256, used by name in prompts: ``farm submit --prompt "portrait, easynegative"``).

Wired into ``farm.cli.main`` as a command group of ``farm``. The checks and storage are
``farm.embeddings``; this module only parses options and prints.
"""

from __future__ import annotations

from pathlib import Path

import click

from farm.cli.common import open_farm


@click.group()
def embedding() -> None:
    """Textual-inversion embeddings: safetensors files stored once by sha256, used by name in prompts."""


@embedding.command("add")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="The word prompts use, e.g. easynegative (matched case-insensitively).")
def embedding_add(file, name):
    """Check FILE (safetensors; A1111 emb_params/string_to_param or diffusers <token> layout; SD1.x width), upload, register."""
    from farm import embeddings

    with open_farm() as farm:
        record = embeddings.add(farm.services, file, name)
    click.echo(
        f"{record.name}: {record.sha256} ({record.format}, {record.vectors} vectors of {record.width}, {record.size} bytes)"
    )


@embedding.command("list")
def embedding_list():
    """Registered embeddings: name, sha256, format, vectors, width."""
    from farm import embeddings

    with open_farm() as farm:
        for record in embeddings.listing(farm.services):
            click.echo(f"{record.name}\t{record.sha256}\t{record.format}\t{record.vectors}\t{record.width}")


@embedding.command("remove")
@click.argument("name")
def embedding_remove(name):
    """Forget a name (the stored file stays: queued and past images name it by sha256)."""
    from farm import embeddings

    with open_farm() as farm:
        embeddings.remove(farm.services, name)
    click.echo(f"removed {name}")


embedding.add_command(embedding_remove, "rm")

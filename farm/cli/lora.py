"""``farm lora``: add, list and remove entries of the LoRA registry (safetensors files stored once
by sha256, named for jobs).

Wired into ``farm.cli.main`` as a command group of ``farm``. The checks and storage are ``farm.loras``;
this module only parses options and prints.
"""

from __future__ import annotations

from pathlib import Path

import click

from farm.cli.common import open_farm


@click.group()
def lora() -> None:
    """The LoRA registry: safetensors files stored once by sha256, named for jobs."""


@lora.command("add")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="The name jobs use: loras=[{\"name\": NAME, \"weight\": 0.8}].")
def lora_add(file, name):
    """Check FILE (safetensors; diffusers or kohya layout; layers of a known base), upload, register."""
    with open_farm() as farm:
        record = farm.add_lora(file, name)
    click.echo(f"{record.name}: {record.sha256} ({record.format}, fits {record.base}, {record.layers} layers, {record.size} bytes)")


@lora.command("list")
def lora_list():
    """Registered LoRAs."""
    with open_farm() as farm:
        for record in farm.list_loras():
            click.echo(f"{record.name}\t{record.sha256}\t{record.format}\t{record.base}\t{record.size}")


@lora.command("rm")
@click.argument("name")
def lora_rm(name):
    """Forget a name (the stored file stays for other names and past images)."""
    with open_farm() as farm:
        farm.remove_lora(name)
    click.echo(f"removed {name}")

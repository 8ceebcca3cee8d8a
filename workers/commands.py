"""GPU-side ``farm`` commands, registered through the ``farm.commands`` entry points (pyproject.toml),
the way Celery registers its sub-commands: the light ``farm`` CLI names them without importing them.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--inpainting", is_flag=True, help="A 9-channel inpainting UNet (the sd-v1-5-inpainting layout).")
def make_tiny(directory: Path, seed: int, inpainting: bool) -> None:
    """Write a tiny random SD-architecture pipeline (diffusers format, safetensors) to DIRECTORY."""
    from workers.diffusion.tiny import make_tiny as build

    click.echo(str(build(directory, seed=seed, in_channels=9 if inpainting else 4)))

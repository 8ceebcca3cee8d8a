"""``farm model evaluate``: measure the shapes model's meaning with plain image analysis.

Renders held-out captions ("a red circle on a blue background" combinations never seen in training)
through the farm's own loader and renderer at the model's default settings, reads foreground
colour, background colour and shape off each image (``evaluation.checks.analyse``) and prints, as
its LAST line, one JSON object: colour_accuracy, background_accuracy, shape_accuracy (0..1),
images, and the settings used.

Wired into ``farm.cli.main`` as a subcommand of ``farm model``. Heavy imports (torch, diffusers) happen
inside the command only, so importing ``farm.cli.main`` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("evaluate")
@click.option("--model", "model_path", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A diffusers folder (default: the shipped models/shapes of this checkout).")
@click.option("--images", type=int, default=64, show_default=True, help="Held-out captions to render.")
@click.option("--guidance-scale", type=float, default=None, help="Default: the model's farm.json.")
@click.option("--steps", type=int, default=None, help="Default: the model's farm.json.")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, at most 2).")
@click.option("--save", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the rendered images to this folder.")
def evaluate(model_path, images, guidance_scale, steps, device, threads, save):
    """Render held-out captions with the shapes model; print accuracies as a JSON last line."""
    from farm.errors import FarmError

    if images < 1:
        raise click.UsageError("--images must be at least 1")
    try:
        from evaluation import checks as semantics

        path = model_path or semantics.DEFAULT_MODEL
        if not (Path(path) / "model_index.json").is_file():
            raise click.ClickException(f"{path} holds no model_index.json (a diffusers pipeline folder)")
        click.echo(f"evaluating {path}: {images} held-out captions on {device}", err=True)
        result = semantics.evaluate(
            path, images=images, guidance_scale=guidance_scale, steps=steps, device=device, save_dir=save, threads=threads
        )
    except FarmError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result))


if __name__ == "__main__":  # python -m evaluation.cli [...] (the same as farm model evaluate)
    evaluate()

"""The ``farm`` command. Every error is one clear line on stderr and a non-zero exit, not a traceback.

This module holds the group and the one-shot commands (submit, status, wait, …, db, model). The
larger groups live beside it and are registered here: ``farm campaign`` (``farm.cli.campaign``),
``farm lora`` (``farm.cli.lora``), ``farm model evaluate`` (``evaluation.cli``); what they
all share (settings, errors, exit codes) is ``farm.cli.common``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from farm.cli.api import api, api_key
from farm.cli.campaign import campaign
from farm.cli.plugins import PluginGroup
from farm.cli.common import EXIT_FAILED, FarmCommands, load_settings, open_farm
from farm.cli.dead_letters import dead_letters
from farm.cli.embedding import embedding
from farm.cli.lora import lora
from farm.cli.operate import exporter, flower, top
from farm.cli.train import train
from farm.errors import ValidationError
from farm.request.text import check_label, check_name


@click.group(cls=FarmCommands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """farm: a render farm for Stable Diffusion v1.x.

    With no FARM_* settings everything is embedded in one local data folder (SQLite, a filesystem
    broker, file storage): `farm worker --cpu` in one shell, `farm submit` in another.
    """


@main.command()
@click.option("--prompt", help="What to draw.")
@click.option("--negative-prompt", default="", help="What not to draw.")
@click.option("--num-images", type=int, default=None, help="Images to render (seeds seed, seed+1, …).")
@click.option("--seed", type=int, default=None, help="First seed; drawn at random and recorded if omitted.")
@click.option("--steps", type=int, default=None, help="Default: the model's own (its farm.json), else FARM_DEFAULT_STEPS.")
@click.option("--guidance-scale", type=float, default=None,
              help="Default: the model's own (its farm.json), else FARM_DEFAULT_GUIDANCE_SCALE.")
@click.option("--width", type=int, default=None,
              help="Default: the init image's width rounded down to a multiple of 8, else the model's own, else FARM_DEFAULT_SIZE.")
@click.option("--height", type=int, default=None,
              help="Default: the init image's height rounded down to a multiple of 8, else the model's own, else FARM_DEFAULT_SIZE.")
@click.option("--scheduler", default=None,
              help="ddim, pndm, euler, euler_a, heun, lms, dpmpp_2m, dpmpp_2m_karras, unipc. Default: the model's own, else FARM_DEFAULT_SCHEDULER.")
@click.option("--model", default=None, help="A name from FARM_MODELS (default FARM_DEFAULT_MODEL).")
@click.option("--file", "file_", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A JSONL file: one request object per line (the same fields, snake_case); image paths relative to it.")
@click.option("--label", default=None, help="A label to find the submission by.")
@click.option("--init-image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="img2img: start from this PNG, JPEG or WebP (uploaded once, by content hash).")
@click.option("--mask", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inpainting: white = repaint, black = keep; the init image's size.")
@click.option("--strength", type=float, default=None, help="0 keeps the init image, 1 ignores it (default 0.75; inpainting 1).")
@click.option("--resize-mode", type=click.Choice(["resize", "crop", "fill"]), default="resize", show_default=True,
              help="How the init image meets --width/--height.")
@click.option("--mask-blur", type=int, default=0, show_default=True, help="Inpainting: blur the mask edge (pixels).")
@click.option("--paste-back", is_flag=True, help="Inpainting: keep the unmasked original pixels exactly.")
@click.option("--clip-skip", type=int, default=1, show_default=True, help="1 or 2, as A1111's Clip skip.")
@click.option("--lora", "loras", multiple=True, help="NAME[:WEIGHT] of a registered LoRA (repeatable).")
@click.option("--safety", default=None,
              help="off, flag, blur or drop: what the safety checker does with the images (default FARM_SAFETY).")
def submit(prompt, negative_prompt, num_images, seed, steps, guidance_scale, width, height, scheduler, model, file_,
           label, init_image, mask, strength, resize_mode, mask_blur, paste_back, clip_skip, loras, safety):
    """Validate and queue a request; print the submission id."""
    if file_ is not None:
        if prompt is not None:
            raise click.UsageError("give --prompt or --file, not both")
        numbered = list(_read_jsonl(file_))
        lines = [number for number, _ in numbered]
        requests = [request for _, request in numbered]
    elif prompt is None:
        raise click.UsageError("give --prompt TEXT or --file requests.jsonl")
    else:
        requests = [
            {
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "num_images": num_images,
                "seed": seed,
                "steps": steps,
                "guidance_scale": guidance_scale,
                "width": width,
                "height": height,
                "scheduler": scheduler,
                "model": model,
                "init_image": str(init_image) if init_image else None,
                "mask": str(mask) if mask else None,
                "strength": strength,
                "resize_mode": resize_mode,
                "mask_blur": mask_blur,
                "paste_back": paste_back,
                "clip_skip": clip_skip,
                "loras": list(loras) or None,
                "safety": safety,
            }
        ]
        lines = ()
    check_label(label, field="--label")
    with open_farm() as farm:
        try:
            # the id is printed the moment the work is recorded, before publishing: whatever happens
            # next, the farm publishes it (farm.reconciler) and the id finds it
            farm.submit_many(
                requests, label=label, base_dir=file_.parent if file_ is not None else None,
                on_recorded=lambda job: click.echo(job.id),
            )
        except ValidationError as exc:
            if lines and exc.index is not None:
                raise exc.at(f"{file_.name} line {lines[exc.index]}") from None
            raise


def _read_jsonl(path: Path):
    """``(line number, request)`` for each non-empty line (a regular UTF-8 file; bad lines named)."""
    from farm.campaigns.prompt_files import json_lines

    return json_lines(path)


@main.command()
@click.argument("submission_id", required=False)
def status(submission_id):
    """Counts by state of a submission (or of the latest ten)."""
    with open_farm() as farm:
        jobs = [farm.submission(submission_id)] if submission_id else farm.latest()
        for job in jobs:
            click.echo(str(job.status()))


@main.command()
@click.argument("submission_id")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (exit 2).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def wait(submission_id, timeout, progress):
    """Wait until every image finished; exit 0 only when each succeeded (or was filtered: safety=drop)."""
    with open_farm() as farm:
        final = farm.submission(submission_id).wait(timeout=timeout, progress=progress)
    click.echo(str(final))
    sys.exit(0 if final.succeeded else EXIT_FAILED)


@main.command()
@click.argument("submission_id")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--partial", is_flag=True, help="Download what has succeeded so far (otherwise unfinished work is refused).")
def download(submission_id, directory, partial):
    """Write the submission's PNGs and a metadata.jsonl to DIRECTORY; exit 1 (nothing written) while
    any image has not succeeded, unless --partial."""
    from farm.errors import Incomplete

    with open_farm() as farm:
        job = farm.submission(submission_id)
        try:
            paths = job.download(directory, partial=partial)
        except Incomplete as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        final = job.status()
    filtered = final.counts.get("filtered", 0)
    missing = final.total - len(paths) - filtered
    click.echo(
        f"{len(paths)} image(s) in {directory}" + (f"; {missing} not (yet) succeeded" if missing else "")
        + (f"; {filtered} filtered by the safety checker (no PNG)" if filtered else "")
    )


@main.command()
@click.argument("submission_id")
def cancel(submission_id):
    """Cancel every image not finished yet."""
    with open_farm() as farm:
        count = farm.submission(submission_id).cancel()
    click.echo(f"canceled {count} image(s)")


@main.command("retry-failed")
@click.argument("submission_id")
def retry_failed(submission_id):
    """Queue a submission's failed images again, with fresh attempts."""
    with open_farm() as farm:
        count = farm.submission(submission_id).retry_failed()
    click.echo(f"queued {count} failed image(s) again")


@main.command()
@click.option("--no-broker-check", is_flag=True, help="Skip comparing the broker's queues with the database.")
def reconcile(no_broker_check):
    """One reconciler round now (every `farm worker` runs it anyway): images of dead workers, work
    never published, messages the broker lost — queued again."""
    with open_farm() as farm:
        result = farm.reconcile(deep=not no_broker_check)
    click.echo(str(result))
    if result.errors:
        sys.exit(1)


@main.command()
@click.argument("submission_id")
def requeue(submission_id):
    """Publish a submission's queued work again (never needed: the reconciler does it by itself);
    duplicates are harmless."""
    with open_farm() as farm:
        count = farm.submission(submission_id).requeue()
    click.echo(f"published {count} task(s)")


@main.command()
@click.option("--model", default=None, help="A name from FARM_MODELS (default FARM_DEFAULT_MODEL).")
@click.option("--gpus", default="all", show_default=True, help="'all' or GPU indices, e.g. 0,1: one process each.")
@click.option("--cpu", is_flag=True, help="Render on the CPU (fp32) instead of GPUs.")
@click.option("--name", default=None, help="Node name (default gpu<N>@host, or cpu@host).")
@click.option("--processes", type=int, default=1, show_default=True, help="With --cpu: how many worker processes.")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(model, gpus, cpu, name, processes, loglevel):
    """Start one worker process per GPU for one model."""
    import logging

    from farm import supervisor

    if name is not None:  # it names the worker in the database (images.worker: varchar(255)) and in Celery
        check_name("--name", name, max_chars=200)
    logging.basicConfig(level=loglevel, format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    settings = load_settings()
    model = model or settings.default_model
    slots = supervisor.plan_slots(gpus, cpu=cpu, name=name, count=processes, model=model)
    sys.exit(supervisor.run(settings, model=model, slots=slots, loglevel=loglevel))


main.add_command(campaign)
main.add_command(lora)
main.add_command(embedding)
main.add_command(dead_letters)
main.add_command(top)
main.add_command(exporter)
main.add_command(flower)
main.add_command(api)
main.add_command(api_key)
main.add_command(train)


@main.group()
def db() -> None:
    """Database schema (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision):
    """Apply migrations to FARM_DATABASE_URL."""
    from farm import db as farm_db

    settings = load_settings()
    engine = farm_db.make_engine(settings.database)
    farm_db.upgrade(engine, revision)
    click.echo(f"database at revision {farm_db.current_revision(engine)}")


@main.group(cls=PluginGroup, plugin_group="model")
def model() -> None:
    """Models: build the tiny test model; evaluate the shapes model."""





@main.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda for the first GPU.")
def demo(out, device):
    """Render a demo batch end to end (a real worker process) and write it to OUT."""
    from farm.demo import run_demo

    click.echo(str(run_demo(load_settings(), out, device=device)))


if __name__ == "__main__":
    main()

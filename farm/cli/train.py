"""``farm train``: LoRA training jobs on the farm's workers (``farm.training``).

    farm train lora --name purple --data shapes-campaign --model shapes --steps 300
    farm train status purple          # last line: one JSON object (state, step, total_steps, loss, …)
"""

from __future__ import annotations

import json

import click

from farm.cli.common import open_farm


@click.group()
def train() -> None:
    """Train LoRAs on the farm's workers; the result is registered and usable in renders."""


@train.command("lora")
@click.option("--name", required=True, help="The LoRA's name once registered (free in `farm lora list`).")
@click.option("--data", required=True, help="A campaign name, an imagefolder directory (metadata.jsonl) or its storage URI.")
@click.option("--model", default=None, help="A name from FARM_MODELS (default FARM_DEFAULT_MODEL).")
@click.option("--rank", type=int, default=None, help="LoRA rank (default 4).")
@click.option("--steps", type=int, default=None, help="Optimiser steps (default 500).")
@click.option("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4).")
@click.option("--batch-size", type=int, default=None, help="Images per step (default 4).")
@click.option("--resolution", type=int, default=None, help="Training size, a multiple of 8 (default: the model's render size).")
@click.option("--text-encoder/--no-text-encoder", default=None, help="Also train a LoRA on the text encoder (default no).")
@click.option("--checkpoint-every", type=int, default=None, help="Steps between checkpoints (default 100).")
@click.option("--sample-every", type=int, default=None, help="Steps between sample images (default 0: at the end only).")
@click.option("--seed", type=int, default=None, help="Seed of the whole run (drawn and recorded if omitted).")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Trade compute for GPU memory.")
@click.option("--offset-noise", type=float, default=None, help="Offset noise (default 0; the shapes model was trained with 0.3).")
@click.option("--min-snr-gamma", type=float, default=None, help="Min-SNR-γ loss weighting (default 5; 0: plain MSE).")
def train_lora(name, data, model, rank, steps, lr, batch_size, resolution, text_encoder, checkpoint_every, sample_every,
               seed, gradient_checkpointing, offset_noise, min_snr_gamma):
    """Check the dataset, record the job and queue it on the model's workers; print its status."""
    from farm import training

    with open_farm() as farm:
        training.submit(
            farm.services, name=name, data=data, model=model, rank=rank, steps=steps, lr=lr, batch_size=batch_size,
            resolution=resolution, text_encoder=text_encoder, checkpoint_every=checkpoint_every,
            sample_every=sample_every, seed=seed, gradient_checkpointing=gradient_checkpointing,
            offset_noise=offset_noise, min_snr_gamma=min_snr_gamma,
        )
        click.echo(json.dumps(_short(training.status(farm.services, name))))


@train.command("status")
@click.argument("name")
def train_status(name):
    """A job's state; the last line is one JSON object (state, step, total_steps, loss, eta_seconds, …)."""
    from farm import training

    with open_farm() as farm:
        found = training.status(farm.services, name)
    loss = f", loss {found['loss']:.4f}" if found["loss"] is not None else ""
    click.echo(f"{found['name']}: {found['state']}, step {found['step']}/{found['total_steps']}{loss}"
               + (f" — {found['error']}" if found["error"] else ""))
    click.echo(json.dumps(found, default=str))


@train.command("cancel")
@click.argument("name")
def train_cancel(name):
    """Cancel a queued or running job (a running one stops at its next heartbeat)."""
    from farm import training

    with open_farm() as farm:
        done = training.cancel(farm.services, name)
    click.echo(f"canceled {name}" if done else f"{name} had already finished")


@train.command("recover")
def train_recover():
    """Queue again jobs whose worker died and publish jobs the broker never got."""
    from farm import training

    with open_farm() as farm:
        names = training.recover(farm.services)
    click.echo(f"published {len(names)} job(s)" + (f": {', '.join(names)}" if names else ""))


def _short(found: dict) -> dict:
    return {k: found[k] for k in ("name", "id", "model", "state", "step", "total_steps", "images", "params")}

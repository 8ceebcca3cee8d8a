"""A LoRA trained on the farm teaches the shapes model a new concept: the farm renders a campaign of
circles, the export is changed by image processing (every circle recoloured purple, the captions
keep the colour asked for), a training job on the changed folder registers a LoRA, and circle
prompts that were not in the campaign, rendered with it, move toward purple (colour share) where the
base model draws the colour asked.

Everything runs through the farm's own paths on an embedded farm, CPU, torch on one thread: campaign
→ worker render task → ``farm campaign export`` → ``farm.training.submit`` → the worker's training
task → a render submission naming the LoRA. docs/training.md records the figures of this test.
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from evaluation.image_analysis import analyse, colour_share, foreground_mask
from evaluation.shape_data import COLOURS, caption, split
from farm import training
from farm.db.tables import CampaignRecord, ImageRecord

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

NEW = "purple"
STEPS = 300
LR = 5e-3
#: the mean purple share of a probe image (pixels within 90 RGB of purple), with the LoRA minus without
MIN_SHARE_GAIN = 0.06
#: probes whose purple share grew with the LoRA
MIN_MOVED = 4
#: probes read as purple (``evaluation.image_analysis.analyse``) with the LoRA (none without)
MIN_PURPLE_RATE = 0.25


def render_everything(farm, ctx, *where) -> None:
    """Render the queued images matching ``where`` as a worker does, one task (task id) at a time."""
    from workers import tasks

    with farm.sessions() as session:
        rows = session.execute(select(ImageRecord.task_id, ImageRecord.id).where(*where).order_by(ImageRecord.position)).all()
    by_task = defaultdict(list)
    for task_id, image_id in rows:
        by_task[task_id].append(image_id)
    for task_id, ids in by_task.items():
        task = SimpleNamespace(request=SimpleNamespace(hostname="effect@test", id=task_id), app=farm.celery)
        tasks.run_render(task, ctx, ids, "shapes")


def images_of(farm, *where) -> list[Image.Image]:
    with farm.sessions() as session:
        rows = session.execute(select(ImageRecord.status, ImageRecord.storage_key).where(*where).order_by(ImageRecord.position)).all()
    assert all(status == "succeeded" for status, _ in rows), rows
    return [Image.open(io.BytesIO(farm.storage.get(key))).convert("RGB") for _, key in rows]


def recolour(image: Image.Image, colour: str) -> Image.Image:
    mask, _ = foreground_mask(image)
    pixels = np.asarray(image).copy()
    pixels[mask] = COLOURS[colour]
    return Image.fromarray(pixels)


def test_a_lora_trained_on_recoloured_farm_renders_moves_held_out_renders_to_the_new_colour(
    embedded_farm, farm_settings, tmp_path
):
    from workers.context import WorkerContext
    from workers.training.task import run_training

    farm = embedded_farm
    timings = {}
    ctx = WorkerContext(settings=farm_settings.model_copy(update={"render_overlap_tasks": False}),
                        model_name="shapes", device="cpu", node="effect@test")
    try:
        # 1. the farm renders a campaign: 16 circle captions of the training split (never purple) × 2 seeds
        train, held = split()
        circles = [c for c in train if c[1] == "circle" and NEW not in (c[0], c[2])][:16]
        rows = [{"id": f"r{i}", "prompt": caption(*c), "model": "shapes"} for i, c in enumerate(circles)]
        started = time.perf_counter()
        farm.campaign("shapes-set").submit(rows, sweeps={"seed": [1, 2]})
        with farm.sessions() as session:
            campaign_id = session.scalar(select(CampaignRecord.id).where(CampaignRecord.name == "shapes-set"))
        render_everything(farm, ctx, ImageRecord.campaign_id == campaign_id)
        timings["render_dataset"] = time.perf_counter() - started

        # 2. export it, and change it: every circle purple, captions as they were
        dataset = tmp_path / "dataset"
        report = farm.campaign("shapes-set").export(str(dataset), fmt="imagefolder")
        assert report.exported == 32
        lines = [json.loads(line) for line in (dataset / "train" / "metadata.jsonl").read_text().splitlines()]
        for row in lines:
            if " circle " in row["text"]:
                path = dataset / "train" / row["file_name"]
                recolour(Image.open(path).convert("RGB"), NEW).save(path)

        # 3. train on the changed folder, on the worker's task
        started = time.perf_counter()
        job = training.submit(farm.services, name="purple-circles", data=str(dataset), model="shapes",
                              steps=STEPS, batch_size=8, rank=4, lr=LR, checkpoint_every=100, seed=0,
                              text_encoder=True, offset_noise=0.3, min_snr_gamma=5.0)
        task = SimpleNamespace(request=SimpleNamespace(hostname="effect@test", id=job.task_id),
                               app=SimpleNamespace(conf=SimpleNamespace(worker_send_task_events=False)))
        outcome = run_training(task, ctx, job.id)
        timings["train"] = time.perf_counter() - started
        status = training.status(farm.services, "purple-circles")
        assert status["state"] == "succeeded", status

        # 4. circle prompts not in the campaign (held-out combinations first), with and without the LoRA
        probes = [c for c in held if c[1] == "circle" and NEW not in (c[0], c[2])]
        probes += [c for c in train if c[1] == "circle" and NEW not in (c[0], c[2]) and c not in circles]
        probes = probes[:8]
        prompts = [{"prompt": caption(*c), "model": "shapes", "seed": 9000 + i} for i, c in enumerate(probes)]
        started = time.perf_counter()
        base = farm.submit_many(prompts)
        tuned = farm.submit_many([{**p, "loras": [{"name": "purple-circles", "weight": 1.0}]} for p in prompts])
        render_everything(farm, ctx, ImageRecord.submission_id.in_([base.id, tuned.id]))
        timings["render_probes"] = time.perf_counter() - started
        before = images_of(farm, ImageRecord.submission_id == base.id)
        after = images_of(farm, ImageRecord.submission_id == tuned.id)
    finally:
        ctx.close(timeout=30)

    share_before = float(np.mean([colour_share(im, NEW) for im in before]))
    share_after = float(np.mean([colour_share(im, NEW) for im in after]))
    rate_before = float(np.mean([analyse(im).colour == NEW for im in before]))
    rate_after = float(np.mean([analyse(im).colour == NEW for im in after]))
    asked_after = float(np.mean([analyse(im).colour == c[0] for im, c in zip(after, probes)]))
    moved = sum(colour_share(b, NEW) < colour_share(a, NEW) for b, a in zip(before, after))
    figures = {
        "probes": len(probes), "steps": STEPS, "final_loss": status["loss"], "lora_sha256": outcome["sha256"][:12],
        "purple_share_base": round(share_before, 3), "purple_share_lora": round(share_after, 3),
        "moved": moved, "purple_rate_base": rate_before, "purple_rate_lora": rate_after, "asked_colour_rate_lora": asked_after,
        **{f"{k}_seconds": round(v, 1) for k, v in timings.items()},
    }
    print(json.dumps(figures))
    assert share_after - share_before >= MIN_SHARE_GAIN, json.dumps(figures)
    assert moved >= MIN_MOVED and rate_after >= MIN_PURPLE_RATE and rate_before == 0.0, json.dumps(figures)

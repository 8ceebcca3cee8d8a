"""The training task (``farm.train_lora``): claim → load → data → (resume) → train with heartbeats,
checkpoints, samples and progress → export the LoRA → register it.

Delivery may repeat, as for renders: every write is guarded by the job's claim token
(``farm.training``), so a duplicated message finds the job held and leaves it alone (it publishes
itself again for when that lease ends, in case the holder died), and a job whose worker died is
claimed again once its lease expired and resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject

from farm import training
from farm.db.tables import LoraRecord, TrainingState, utcnow
from farm.errors import FarmError, MissingObject, StorageError, ValidationError
from farm.retrying import is_infrastructure
from farm.training import TRAIN_TASK
from workers.context import WorkerContext

log = logging.getLogger("farm.worker.training")

#: Seconds between progress events (Flower) and between progress records in the database.
PROGRESS_EVERY = 0.25
RECORD_EVERY = 1.0
#: Loss points kept in the job's info (the checkpoints keep every step's).
LOSS_POINTS = 200


def register(app: Celery, context: WorkerContext) -> Task:
    @app.task(name=TRAIN_TASK, bind=True, acks_late=True)
    def train_lora(task: Task, *args, **kwargs) -> dict:
        job_id, model = kwargs.get("job_id"), kwargs.get("model")
        if args or not isinstance(job_id, str) or not isinstance(model, str) or len(job_id) > 64:
            from workers.consumption import refuse_task

            return refuse_task(task, "farm.train_lora takes keyword arguments job_id and model (strings) only")
        return run_training(task, context, job_id)

    return train_lora


def _after_step(step: int) -> None:
    """Called after every optimiser step (tests interrupt a run here, as a worker that dies would)."""


def _services(ctx: WorkerContext):
    from farm.services import Services

    sessions = ctx.sessions
    return Services(settings=ctx.settings, engine=sessions.kw["bind"], sessions=sessions)


def run_training(task: Task, ctx: WorkerContext, job_id: str) -> dict:
    settings = ctx.settings
    worker = f"{getattr(task.request, 'hostname', None) or 'worker'}/{os.getpid()}"
    try:
        token, job = training.claim(
            ctx.sessions, job_id, worker=worker, lease_seconds=settings.claim_lease_seconds, max_attempts=settings.max_attempts,
        )
    except Exception as exc:
        if is_infrastructure(exc):
            raise Reject(f"database away: {type(exc).__name__}", requeue=True) from exc
        raise
    if token is None:
        if job is not None and job.state == TrainingState.running.value and job.lease_expires_at is not None:
            # another delivery holds it: look again when its lease ends (if its worker died, we take over)
            wait = max(0.0, (job.lease_expires_at - utcnow()).total_seconds())
            try:
                training.publish_job(ctx.sessions, task.app, settings, job_id, countdown=wait + 1)
            except Exception:  # noqa: BLE001 - `farm train recover` finds it
                log.warning("training job %s held elsewhere; could not publish it again", job_id)
        return {"job": job_id, "skipped": job.state if job is not None else "missing"}
    if job.model != ctx.model_name:
        training.finish(ctx.sessions, token, state=TrainingState.failed,
                        error=f"job for model {job.model!r} reached a worker of {ctx.model_name!r}")
        return {"job": job_id, "failed": "model"}
    try:
        return _train(task, ctx, token, job)
    except Exception as exc:  # noqa: BLE001
        # the database, broker or storage away (a missing object is the job's own fault): not the job's
        # fault, back to the queue, to resume from its last checkpoint
        if is_infrastructure(exc) or (isinstance(exc, StorageError) and not isinstance(exc, MissingObject)):
            training.release(ctx.sessions, token, f"queued again: {type(exc).__name__}: {exc}")
            try:
                training.publish_job(ctx.sessions, task.app, settings, job_id, countdown=30)
            except Exception:  # noqa: BLE001
                log.warning("training job %s released; `farm train recover` publishes it", job_id)
            return {"job": job_id, "released": str(exc)}
        log.exception("training job %s failed", job.name)
        training.finish(ctx.sessions, token, state=TrainingState.failed, error=f"{type(exc).__name__}: {exc}")
        return {"job": job_id, "failed": f"{type(exc).__name__}: {exc}"}


def _train(task: Task, ctx: WorkerContext, token: str, job) -> dict:
    from PIL import Image
    import io

    from safetensors.torch import load as load_tensors
    from safetensors.torch import save as save_tensors

    from farm.catalogue import Catalogue
    from workers.diffusion.pipeline import check_model_folder, resolve_location
    from workers.training.loop import Trainer, png_bytes

    settings, storage = ctx.settings, ctx.storage
    params = job.params
    lease = settings.claim_lease_seconds
    path = resolve_location(job.model, settings.models[job.model], settings.models_dir)
    check_model_folder(path)
    defaults = Catalogue(settings).defaults(job.model)
    started = time.perf_counter()
    trainer = Trainer(
        path, rank=params["rank"], lr=params["lr"], batch_size=params["batch_size"], resolution=params["resolution"],
        seed=params["seed"], text_encoder=params["text_encoder"],
        gradient_checkpointing=params.get("gradient_checkpointing", False), offset_noise=params.get("offset_noise", 0.0),
        min_snr_gamma=params.get("min_snr_gamma", 0.0), device=ctx.device,
    )
    items = params["dataset"]["items"]
    images = []
    for item in items:
        with Image.open(io.BytesIO(storage.get(item["key"]))) as image:
            images.append(image.convert("RGB"))
    trainer.set_data(images, [item["text"] for item in items])
    del images
    info: dict[str, Any] = dict(job.info or {})
    info.setdefault("samples", {})
    info["load_seconds"] = round(time.perf_counter() - started, 2)
    prefix = f"training/{job.id}"
    resumed_from = None
    if job.checkpoint_key:
        tensors = load_tensors(storage.get(job.checkpoint_key))
        meta = json.loads(storage.get(job.checkpoint_key.removesuffix(".safetensors") + ".json"))
        trainer.restore(tensors, meta)
        resumed_from = trainer.step
        info.setdefault("resumed_from", []).append(resumed_from)
        log.info("training job %s resumes at step %d", job.name, resumed_from)
    total = job.total_steps
    every, sample_every = params["checkpoint_every"], params["sample_every"]
    prompts = params.get("sample_prompts") or []
    send_events = bool(getattr(task.app.conf, "worker_send_task_events", False))
    run_start, run_first = time.perf_counter(), trainer.step
    last_event = last_record = 0.0

    def eta() -> float | None:
        done = trainer.step - run_first
        if done <= 0:
            return None
        return round((time.perf_counter() - run_start) / done * (total - trainer.step), 1)

    def losses() -> list:
        stride = max(1, total // LOSS_POINTS)
        return [[i + 1, round(v, 5)] for i, v in enumerate(trainer.losses) if (i + 1) % stride == 0 or i + 1 == len(trainer.losses)]

    def save_checkpoint() -> None:
        tensors, meta = trainer.checkpoint()
        key = f"{prefix}/checkpoint-{trainer.step:07d}.safetensors"
        storage.put(key, save_tensors(tensors, metadata={"format": "pt", "farm": "training-checkpoint"}),
                    content_type="application/octet-stream")
        storage.put(key.removesuffix(".safetensors") + ".json", json.dumps(meta).encode(), content_type="application/json")
        if not training.heartbeat(ctx.sessions, token, lease, step=trainer.step, loss=trainer.losses[-1],
                                  info={**info, "eta_seconds": eta(), "losses": losses()}, checkpoint=(key, trainer.step)):
            raise _Stopped()

    def sample() -> None:
        if not prompts:
            return
        keys = []
        for number, image in enumerate(trainer.samples(prompts, steps=defaults.steps, guidance_scale=defaults.guidance_scale)):
            key = f"{prefix}/samples/step-{trainer.step:07d}-{number}.png"
            storage.put(key, png_bytes(image), content_type="image/png")
            keys.append(key)
        info["samples"][str(trainer.step)] = keys

    metrics = ctx.metrics

    def progress(running: bool = True) -> None:  # the worker's Prometheus gauges (workers.metrics)
        metrics.training(job.name, job.model, step=trainer.step, total=total,
                         loss=trainer.losses[-1] if trainer.losses else None, eta=eta(), running=running)

    progress()
    try:
        while trainer.step < total:
            loss = trainer.train_step()
            step = trainer.step
            _after_step(step)
            progress()
            now = time.perf_counter()
            if sample_every and step % sample_every == 0 and step < total:
                sample()
            if step % every == 0 and step < total:
                save_checkpoint()
                last_record = now
            elif now - last_record >= RECORD_EVERY:
                last_record = now
                try:  # best-effort: a database blip skips a beat (the lease outlasts several)
                    held = training.heartbeat(ctx.sessions, token, lease, step=step, loss=loss,
                                              info={**info, "eta_seconds": eta(), "losses": losses()})
                except Exception as exc:  # noqa: BLE001
                    if not is_infrastructure(exc):
                        raise
                    log.warning("heartbeat skipped: %s", type(exc).__name__)
                    held = True
                if not held:
                    raise _Stopped()
            if send_events and (now - last_event >= PROGRESS_EVERY or step == total):
                last_event = now
                remaining = eta()
                try:
                    task.send_event(
                        "task-progress",
                        result=f"step {step}/{total} · loss {loss:.4f}" + (f" · ETA {remaining:.0f} s" if remaining is not None else ""),
                        step=step, steps=total, loss=loss, eta=remaining,
                    )
                except Exception:  # noqa: BLE001
                    log.debug("progress event not sent", exc_info=True)
    except _Stopped:
        progress(running=False)
        log.warning("training job %s stopped at step %d: canceled or taken over", job.name, trainer.step)
        return {"job": job.id, "stopped": trainer.step}
    except Exception:
        progress(running=False)
        raise

    # the end: samples, the LoRA in storage, registered under the job's name
    progress(running=False)
    sample()
    data = trainer.lora_bytes()
    lora_key = f"{prefix}/{job.name}.safetensors"
    storage.put(lora_key, data, content_type="application/octet-stream")
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    info.update({"lora_key": lora_key, "losses": losses(), "eta_seconds": 0, "train_seconds": round(time.perf_counter() - run_start, 2)})
    services = _services(ctx)
    try:
        record = farm_loras_add(services, data, job.name)
        info["lora"] = {"name": record.name, "sha256": record.sha256, "base": record.base, "format": record.format}
    except ValidationError as exc:
        with ctx.sessions() as session:  # registered already by an earlier attempt of this job?
            from sqlalchemy import select

            existing = session.scalar(select(LoraRecord).where(LoraRecord.name == job.name))
        if existing is None or existing.sha256 != sha:
            training.finish(ctx.sessions, token, state=TrainingState.failed, step=trainer.step, loss=trainer.losses[-1],
                            info=info, error=f"trained, but not registered: {exc} (the LoRA is at {lora_key})")
            return {"job": job.id, "failed": str(exc)}
        info["lora"] = {"name": existing.name, "sha256": existing.sha256, "base": existing.base, "format": existing.format}
    training.finish(ctx.sessions, token, state=TrainingState.succeeded, step=trainer.step, loss=trainer.losses[-1], info=info)
    log.info("training job %s: LoRA %s registered (%s)", job.name, job.name, sha[:12])
    return {"job": job.id, "steps": trainer.step, "sha256": sha, "resumed_from": resumed_from}


def farm_loras_add(services, data: bytes, name: str):
    from farm import loras

    return loras.add(services, data, name)


class _Stopped(FarmError):
    """The claim is gone (the job was canceled, or its lease expired and another worker took it)."""

"""The render task: claim → inputs → LoRAs → render in chunks → hand off (encode, upload, record).

Read top to bottom, it is the whole life of a task on a worker. Delivery may repeat (late acks,
requeue on a lost worker, visibility timeouts), so every write goes through ``farm.lifecycle``: each
image is rendered and recorded once however often its message arrives.

A task returns once its last chunk is handed to the process's :class:`~workers.finishing.finisher.Finisher`
(``FARM_RENDER_OVERLAP_TASKS``, on by default): the next task renders while those PNGs upload. The
images stay claimed, their leases renewed, until each is recorded after its upload; if the process
dies first, the leases run out and the reconciler queues them again.

Faults that are not the images' (the database or broker away, a warm shutdown) never count against
their attempts: database steps are retried until ``FARM_INFRA_DEADLINE_SECONDS`` (``farm.retrying``),
side channels (progress events, progress records, heartbeats) are best-effort, and images handed
back are released without an attempt. Only a worker that vanished mid-render counts one
(``FARM_MAX_ATTEMPTS``).
"""

from __future__ import annotations

import logging
import os
import time

from celery import Celery, Task
from celery.exceptions import Reject

from farm import lifecycle
from farm.dispatch.publish import publish_images
from farm.dispatch.celery_app import RENDER_TASK
from farm.errors import ModelLoadError, PublishError, RenderError, StorageError
from farm.retrying import is_infrastructure, until_deadline
from farm.storage.keys import image_key
from farm.imaging.pnginfo import a1111_extra, a1111_parameters, encode_png
from farm.db.tables import ImageRecord
from farm.request.spec import ImageSpec
from workers.consumption import check_render_arguments, refuse_task
from workers.context import WorkerContext
from workers.input_cache import InputError
from workers.lora.disk_cache import LoraError

log = logging.getLogger("farm.worker")

#: Seconds between progress events a task sends (Flower shows the PROGRESS state; Redis only).
PROGRESS_EVERY = 0.5
#: Seconds between the denoising-step progress records for ``farm wait`` (one UPDATE each), counted
#: from the chunk's start: a chunk shorter than this records none (its images' success moves
#: ``farm wait`` on), a longer one at most one per this many seconds. Issue 16: ≤ 2 database
#: transactions per chunk (the claim and the chunk's record) at production chunk times (~1.3 s).
PROGRESS_REPORT_EVERY = 3.0


class ImagesFailed(RenderError):
    """Raised when a render task ends with images that failed (each recorded with its reason): the
    task then shows FAILURE in Flower with a summary, e.g. "2 of 8 image(s) failed: input ×2 (InputError:
    …)", instead of a SUCCESS that hides them. Expected: Celery logs it without a traceback."""


def register(app: Celery, context: WorkerContext) -> Task:
    @app.task(name=RENDER_TASK, bind=True, max_retries=context.settings.max_retries, acks_late=True, throws=(ImagesFailed,))
    def render(task: Task, *args, **kwargs) -> dict:
        # the consumer checked the message already (workers.consumption); a shape that got past it
        # is kept as a dead letter too, never run
        problem = check_render_arguments(args, kwargs, context.settings)
        if problem:
            return refuse_task(task, problem)
        return run_render(task, context, kwargs["image_ids"], kwargs["model"])

    return render


def run_render(task: Task, ctx: WorkerContext, image_ids: list[str], model: str) -> dict:
    shutdown = ctx.shutdown
    shutdown.install()
    shutdown.busy = True
    ctx.task_failures = []
    ctx.task_topped_up = 0
    try:
        outcome = _run_render(task, ctx, image_ids, model)
        if ctx.task_failures:  # Flower shows the task failed, with why (the images are recorded)
            raise ImagesFailed(_failure_summary(ctx.task_failures, len(image_ids) + ctx.task_topped_up))
        return outcome
    finally:
        shutdown.busy = False
        if shutdown.requested:  # SIGTERM came during this task: finish uploads, then leave
            shutdown.exit_after_task(ctx.close, timeout=ctx.settings.shutdown_seconds + 60)


def _run_render(task: Task, ctx: WorkerContext, image_ids: list[str], model: str) -> dict:
    settings = ctx.settings
    worker = f"{task.request.hostname or 'worker'}/{os.getpid()}"

    # 1. this worker serves one model; its queue only carries that model's work
    if model != ctx.model_name:
        raise RenderError(f"task for model {model!r} reached a worker of {ctx.model_name!r}")

    # 2. claim the images (queued ones, or those of a worker whose lease expired); a database
    #    outage is waited out, then the message goes back to the queue (nothing counted, nothing lost)
    if ctx.shutdown.requested:
        raise Reject("shutting down", requeue=True)
    metrics = ctx.metrics
    started = time.perf_counter()
    try:
        claim = _db(ctx, "claim", lambda: lifecycle.claim(
            ctx.sessions, image_ids, worker=worker, lease_seconds=settings.claim_lease_seconds,
            max_attempts=settings.max_attempts, top_up=_chunk_size(ctx) if settings.top_up else None,
        ))
    except Exception as exc:
        if is_infrastructure(exc):
            raise Reject(f"database away: {type(exc).__name__}", requeue=True) from exc
        raise
    if claim.held_elsewhere:
        # Another delivery of this task is rendering them (or died doing so): look again when its
        # lease ends. A finished image is then simply skipped. Best-effort: if this message is lost,
        # the lease ends and the reconciler queues them.
        try:
            publish_images(
                ctx.sessions, task.app, settings, claim.held_elsewhere, origin=f"task {task.request.id}",
                countdown=claim.wait_seconds + 1,
            )
        except Exception:  # noqa: BLE001
            log.warning("could not publish %d image(s) held elsewhere; their lease decides", len(claim.held_elsewhere))
    if claim.topped_up:
        ctx.task_topped_up = len(claim.topped_up)
        log.info("task %s: topped up with %d queued image(s) of other tasks", task.request.id, len(claim.topped_up))
    metrics.phase("claim", time.perf_counter() - started)
    metrics.queue_wait([image.queued_at for image in claim.images])
    if claim.given_up:
        metrics.failed("gave up after attempts", len(claim.given_up))
    if not claim.images:
        return {"rendered": 0, "held_elsewhere": len(claim.held_elsewhere)}
    specs = [ImageSpec.from_params(image.params) for image in claim.images]

    # 3. fetch each image's inputs; an image whose stored input is missing or corrupt fails alone
    started = time.perf_counter()
    images, specs, conditions = _fetch_inputs(ctx, claim, specs)
    metrics.phase("inputs", time.perf_counter() - started)
    if not images:
        return {"rendered": 0, "failed": len(claim.images)}

    # 4. the batch's LoRAs: from the pipeline (cache), the worker's disk, or storage (download)
    started = time.perf_counter()
    try:
        lora_report = _activate_loras(ctx, specs[0].loras)
        if specs[0].loras:
            metrics.phase("lora", time.perf_counter() - started)
            for lora in lora_report:
                metrics.lora(str(lora["served"]))
    except StorageError as exc:  # storage away: not the images' fault, hand them back
        _hand_back(task, ctx, claim.token, [i.id for i in images], f"LoRA download: {exc}")
        return {"rendered": 0, "handed_back": len(images)}
    except LoraError as exc:
        _fail(ctx, claim.token, [i.id for i in images], f"{type(exc).__name__}: {exc}")
        log.warning("batch of %d failed: %s", len(specs), exc)
        return {"rendered": 0, "failed": len(specs)}
    finally:
        if specs[0].loras:
            ctx.advertise()

    # 5. render in chunks this GPU fits at this size (workers.diffusion.batching), renewing the lease and
    #    reporting progress; each chunk goes to the finisher (PNG encode, upload, then record, on
    #    threads) while the next chunk, or the next task, renders
    return _render_and_hand_off(task, ctx, claim, model, images, specs, conditions, lora_report)


def _chunk_size(ctx: WorkerContext):
    """The claim's top-up target: images this worker renders at once at ``width``×``height`` (its
    calibrated or configured chunk, shrunk on out-of-memory; else ``FARM_MAX_BATCH_SIZE``)."""

    def size(width: int, height: int) -> int:
        unbounded = 1 << 30
        chunk = ctx.batch_plan.size_for(width, height, unbounded)
        return ctx.settings.max_batch_size if chunk >= unbounded else chunk

    return size


def _render_and_hand_off(task: Task, ctx: WorkerContext, claim: lifecycle.Claim, model: str, images, specs, conditions, lora_report) -> dict:
    from workers.diffusion.batching import free_memory, is_out_of_memory

    settings = ctx.settings
    plan = ctx.batch_plan
    width, height = specs[0].width, specs[0].height
    give_back = _give_back(task, ctx, claim.token, model)
    todo = list(range(len(specs)))
    handoffs, rendered, seconds = [], 0, 0.0
    while todo:
        if ctx.shutdown.requested:  # SIGTERM: the chunks not started go back to the queue
            _hand_back(task, ctx, claim.token, [images[n].id for n in todo], "the worker shut down")
            return {"rendered": rendered, "handed_back": len(todo), "chunks": len(handoffs)}
        size = plan.size_for(width, height, len(todo))
        chunk = todo[:size]
        try:
            batch = _render(task, ctx, claim, [images[n].id for n in chunk], [specs[n] for n in chunk], [conditions[n] for n in chunk])
        except (RenderError, ModelLoadError, ValueError, RuntimeError) as exc:
            if size > 1 and is_out_of_memory(exc):  # fewer at once, and remember it for this size
                free_memory(ctx.device)
                plan.shrink(width, height, size)
                continue
            # CUDA out of memory at one image, a kernel error, a batch the model cannot render: the
            # images not rendered yet fail with the reason; the worker goes on with the next task
            _fail(ctx, claim.token, [images[n].id for n in todo], f"{type(exc).__name__}: {exc}")
            (log.exception if type(exc) is RuntimeError else log.warning)("batch of %d failed: %s", len(todo), exc)
            return {"rendered": rendered, "failed": len(todo), "chunks": len(handoffs)}
        if batch.interrupted and ctx.shutdown.requested:  # stopped past FARM_SHUTDOWN_SECONDS
            _hand_back(task, ctx, claim.token, [images[n].id for n in todo], "the worker shut down")
            return {"rendered": rendered, "handed_back": len(todo), "chunks": len(handoffs)}
        if batch.interrupted:  # every image of the claim was canceled
            return {"rendered": rendered, "canceled": len(todo), "chunks": len(handoffs)}
        metrics = ctx.metrics
        metrics.chunk(len(chunk))
        metrics.images("rendered", len(chunk))
        for phase, phase_seconds in batch.phases.items():
            metrics.phase(phase, phase_seconds)
        metrics.gpu_memory(ctx.device)
        seconds_each = batch.seconds / len(chunk)
        items = [
            finish_item(
                ctx.model, ctx.device, images[n], specs[n], result,
                seconds_each=seconds_each, batch_size=len(chunk), loras=lora_report,
            )
            for n, result in zip(chunk, batch.images)
        ]
        handoffs.append(_finisher(ctx).hand_off(claim.token, items, give_back))
        ctx.report_finisher()
        rendered += len(chunk)
        seconds += batch.seconds
        todo = todo[size:]
    outcome = {"rendered": rendered, "seconds": round(seconds, 3), "chunks": len(handoffs)}
    if not settings.render_overlap_tasks:  # acked only once each image is recorded (or given back)
        ctx.finisher.wait(handoffs)
        outcome["recorded"] = sum(len(h.recorded) for h in handoffs)
        outcome["queued_again"] = sum(len(h.failed) for h in handoffs)
    return outcome


def _finisher(ctx: WorkerContext):
    """The process's finisher, recording each hand-off's images together (``record_many``: one
    database transaction per chunk, ``lifecycle.record_success_many``) rather than one per image."""
    finisher = ctx.finisher
    if getattr(finisher, "record_many", None) is None:
        finisher.record_many = _record_many(ctx)
    return finisher


def _record_many(ctx: WorkerContext):
    """``record_many(token, [(image_id, key, values)…])`` for the finisher: the chunk's successes in one
    transaction, a database outage waited out (FARM_INFRA_DEADLINE_SECONDS); returns the ids recorded.
    Reads the context now (on the task's thread): the finisher calls it from its upload threads."""
    sessions, settings, metrics = ctx.sessions, ctx.settings, ctx.metrics

    def record_many(token: str, rows) -> list[str]:
        images = [(image_id, {"storage_key": key, **values}) for image_id, key, values in rows]
        started = time.perf_counter()
        recorded = until_deadline(
            lambda: lifecycle.record_success_many(sessions, token, images),
            deadline_seconds=settings.infra_deadline_seconds, what="record a chunk",
        )
        metrics.phase("record", time.perf_counter() - started)
        return recorded

    return record_many


#: Seconds before images that could not be stored are delivered again (after the uploader's retries).
REQUEUE_DELAY = 30


def _give_back(task: Task, ctx: WorkerContext, token: str, model: str):
    """What the finisher calls for rendered images it could not store or record within its deadline:
    queue them again (storage away is not the images' fault: no attempt counted)."""

    def give_back(image_ids: list[str], error: BaseException) -> None:
        _hand_back(task, ctx, token, image_ids, f"{type(error).__name__}: {error}", countdown=REQUEUE_DELAY)

    return give_back


def _hand_back(task: Task, ctx: WorkerContext, token: str, image_ids: list[str], why: str, countdown: float | None = None) -> None:
    """Release ``image_ids`` of the claim to the queue (no attempt counted) and publish them; if the
    publish fails they stay marked in the outbox and the reconciler sends them."""
    note = f"queued again: {why}"
    released = _db(ctx, "release", lambda: lifecycle.release(ctx.sessions, token, note=note, image_ids=image_ids))
    if not released:
        return
    ctx.metrics.images("handed_back", len(image_ids))
    try:
        publish_images(ctx.sessions, task.app, ctx.settings, image_ids, origin=f"task {task.request.id}", countdown=countdown)
    except (PublishError, Exception) as exc:  # noqa: BLE001 - the outbox has them
        log.warning("%d image(s) released; publishing them is left to the reconciler (%s)", len(image_ids), type(exc).__name__)
    log.warning("%d image(s) %s", len(image_ids), note)


def _fail(ctx: WorkerContext, token: str, image_ids: list[str], error: str) -> None:
    """Fail images of the claim for a reason that is theirs (counted in the metrics by class, and
    summed up in the task's own failure for Flower)."""
    failed = _db(ctx, "record failure", lambda: lifecycle.record_failure(ctx.sessions, token, image_ids, error))
    if failed:
        ctx.metrics.failed(error, failed)
        ctx.task_failures.append((failed, error))


def _failure_summary(failures: list[tuple[int, str]], total: int) -> str:
    """"3 of 8 image(s) failed: input ×2 (InputError: …), out_of_memory ×1 (…)"."""
    from farm.failures import reason_class

    by_class: dict[str, list] = {}
    for count, error in failures:
        entry = by_class.setdefault(reason_class(error), [0, error])
        entry[0] += count
    failed = sum(count for count, _ in failures)
    parts = [f"{name} ×{count} ({example[:120]})" for name, (count, example) in by_class.items()]
    return f"{failed} of {total} image(s) failed: " + "; ".join(parts)


def _db(ctx: WorkerContext, what: str, step):
    """A database step, retried through an outage until FARM_INFRA_DEADLINE_SECONDS."""
    return until_deadline(step, deadline_seconds=ctx.settings.infra_deadline_seconds, what=what)


def _activate_loras(ctx: WorkerContext, loras) -> list[dict]:
    """Load (or reuse) the batch's adapters at their weights; report how each was served."""
    if not loras and ctx._adapters is None:
        return []  # never used LoRA in this process: nothing to switch off
    from farm.storage.keys import content_key

    files = {}
    for sha, _weight in loras:
        files[sha] = ctx.lora_files.path(sha, content_key("loras", sha, "safetensors"))
    served = ctx.adapters.activate([(sha, files[sha][0], weight) for sha, weight in loras])
    return [
        {"sha256": sha, "weight": weight, "served": "cache" if served.get(sha) == "cache" else files[sha][1]}
        for sha, weight in loras
    ]


def _fetch_inputs(ctx: WorkerContext, claim: lifecycle.Claim, specs: list[ImageSpec]):
    """The init images and masks of the claimed images, from the worker's cache or storage."""
    from workers.diffusion.render import Conditioning

    images, kept, conditions = [], [], []
    for image, spec in zip(claim.images, specs):
        try:
            conditions.append(
                Conditioning(
                    init=ctx.inputs.image(spec.init_image_key) if spec.init_image_key else None,
                    mask=ctx.inputs.image(spec.mask_key) if spec.mask_key else None,
                )
            )
        except (StorageError, InputError) as exc:
            _fail(ctx, claim.token, [image.id], f"{type(exc).__name__}: {exc}")
            log.warning("image %s: %s", image.id, exc)
            continue
        images.append(image)
        kept.append(spec)
    return images, kept, conditions


def _render(task: Task, ctx: WorkerContext, claim: lifecycle.Claim, image_ids: list[str], specs: list[ImageSpec], conditions):
    from workers.diffusion.render import render_batch

    settings = ctx.settings
    last_beat = last_event = last_report = time.monotonic()
    send_events = bool(task.app.conf.worker_send_task_events)

    def on_step(done: int, total: int) -> bool:
        nonlocal last_beat, last_event, last_report
        if ctx.shutdown.overdue():  # SIGTERM long enough ago: stop here, hand the images back
            return False
        now = time.monotonic()
        # side channels are best-effort: a Redis or database blip never fails the batch (an image
        # still counts as held: only a cancel, read from a live database, stops the render)
        if send_events and (now - last_event >= PROGRESS_EVERY or done == total):
            last_event = now
            try:  # ``result`` is the field Flower shows (task page and list) while a task runs
                task.send_event(
                    "task-progress", result=f"step {done}/{total} · {len(specs)} image(s)",
                    step=done, steps=total, images=len(specs),
                )
            except Exception:  # noqa: BLE001
                log.debug("progress event not sent", exc_info=True)
        try:
            if now - last_beat >= settings.claim_lease_seconds / 4:
                last_beat = now
                return lifecycle.heartbeat(ctx.sessions, claim.token, settings.claim_lease_seconds) > 0
            if now - last_report >= PROGRESS_REPORT_EVERY and done < total:  # `farm wait` advances by steps
                last_report = now
                return lifecycle.report_progress(ctx.sessions, claim.token, image_ids, done, total) > 0
        except Exception as exc:  # noqa: BLE001
            if not is_infrastructure(exc):
                raise
            log.warning("heartbeat skipped: %s", type(exc).__name__)
        return True

    return render_batch(
        ctx.model, specs, base_scheduler_config=ctx.model.scheduler_config, conditions=conditions, on_step=on_step
    )


def finish_item(
    model, device: str, image: ImageRecord, spec: ImageSpec, result, *, seconds_each: float, batch_size: int, loras
):
    """What the finisher needs for one rendered image of ``model`` (a ``LoadedModel``): its key, its
    PNG (encoded on a pool thread, with the A1111 parameters and the farm's spec), the object's
    metadata and the record's values. ``image`` needs only ``id`` and ``submission_id``."""
    from workers.finishing.finisher import Item

    parameters = a1111_parameters(spec.params(), model_name=spec.model, model_hash=model.hash, extra=a1111_extra(spec))
    full_spec = {
        **spec.params(),
        "image_id": image.id,
        "submission_id": image.submission_id,
        "model_hash": model.hash,
        "model_path": str(model.path),
    }
    return Item(
        image_id=image.id,
        key=image_key(image.submission_id, image.id),
        make=lambda: encode_png(result.image, parameters=parameters, spec=full_spec),
        metadata={
            "farm-image-id": image.id,
            "farm-submission-id": image.submission_id,
            "farm-seed": str(spec.seed),
            "farm-steps": str(spec.steps),
            "farm-guidance-scale": str(spec.guidance_scale),
            "farm-scheduler": spec.scheduler,
            "farm-size": f"{spec.width}x{spec.height}",
            "farm-model-hash": model.hash,
        },
        values={
            "gpu_seconds": seconds_each,
            "prompt_tokens": result.prompt_tokens,
            "prompt_truncated": result.prompt_truncated,
            "model_path": str(model.path),
            "info": {"model_hash": model.hash, "device": device, "batch_size": batch_size, "loras": loras},
        },
    )


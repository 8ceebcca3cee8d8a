"""Publishing work: every render message the farm sends goes through :func:`publish`.

A submission's images are grouped into tasks by batch key (:func:`plan_batches`); a task message
carries ids and plain values only. Work published *again* — a submission requeued, a campaign
resumed or retried, images a dead worker held (the lease sweeper), images a worker gives back
(storage down) or finds held by another delivery — goes through :func:`publish_images`, which reads
each image's task, model and priority from the database, so it keeps its campaign priority and
its original task id (a duplicate delivery is harmless: ``farm.lifecycle`` claims each image once).

The database is the outbox: a submission is recorded before it is published (``published_at`` set
once every task reached the broker), and an image queued again carries ``publish_after`` until
:func:`publish_images` has sent it. :func:`publish_outbox` — the reconciler's step — publishes what a
dead submitter or a refusing broker left behind.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import timedelta
from itertools import islice
from typing import Any, Iterable, Sequence

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from farm.db.tables import CampaignRecord, ImageRecord, Status, SubmissionRecord, utcnow
from farm.dispatch.celery_app import RENDER_TASK
from farm.errors import PublishError
from farm.request.spec import ImageSpec
from farm.settings import Settings

__all__ = ["Batch", "plan_batches", "publish", "publish_images", "publish_outbox", "publish_queued", "mark_published"]

#: Priority of plain submissions (0 is served first); campaigns use their own (FARM_CAMPAIGN_PRIORITY).
SUBMISSION_PRIORITY = 0


@dataclass(frozen=True)
class Batch:
    """One task: images rendered together on one GPU."""

    task_id: str
    model: str
    image_ids: tuple[str, ...]
    label: str  # what Flower shows beside the task name
    loras: tuple[str, ...] = ()  # sha256s its images use (for affinity routing)
    queue: str | None = None  # a warm worker's own queue; None: the model's shared queue
    priority: int = SUBMISSION_PRIORITY

    @classmethod
    def of(cls, task_id: str, image_ids: Sequence[str], spec: ImageSpec) -> "Batch":
        label = (
            f"{_excerpt(spec.prompt)} · {len(image_ids)}× {spec.width}x{spec.height}, {spec.steps} steps, "
            f"{spec.scheduler}, cfg {spec.guidance_scale}"
        )
        if spec.mode != "txt2img":
            label += f", {spec.mode}"
        if spec.loras:
            label += f", {len(spec.loras)} LoRA(s)"
        return cls(task_id=task_id, model=spec.model, image_ids=tuple(image_ids), label=label,
                   loras=tuple(sha for sha, _ in spec.loras))


def _excerpt(prompt: str, chars: int = 48) -> str:
    """A prompt as Flower shows it beside the task: one line, shortened."""
    text = " ".join(prompt.split())
    return repr(text if len(text) <= chars else text[: chars - 1] + "…")


def plan_batches(images: Sequence[tuple[str, ImageSpec]], max_batch_size: int) -> list[Batch]:
    """Group ``(image_id, spec)`` pairs by batch key, in submission order, into tasks of bounded size."""
    groups: dict[tuple, list[tuple[str, ImageSpec]]] = defaultdict(list)
    for image_id, spec in images:
        groups[spec.batch_key].append((image_id, spec))
    batches = []
    for members in groups.values():
        it = iter(members)
        while chunk := list(islice(it, max_batch_size)):
            batches.append(Batch.of(str(uuid.uuid4()), [image_id for image_id, _ in chunk], chunk[0][1]))
    return batches


def publish(
    app: Celery,
    batches: Sequence[Batch],
    settings: Settings,
    *,
    origin: str,
    priority: int | None = None,
    countdown: float | None = None,
) -> int:
    """Send one task message per batch to its queue; returns how many were sent.

    ``priority`` (0 served first, 9 last; Redis) overrides each batch's own; ``countdown`` delays
    delivery. ``origin`` (a submission id, ``campaign:NAME``…) names the work in errors and in Flower.
    Raises :class:`~farm.errors.PublishError` when the broker refuses: what was recorded stays
    queued in the database and is published again.
    """
    count = 0
    amqp = app.amqp
    if any(batch.loras for batch in batches):
        from farm.dispatch.routing import Router

        router = Router.for_settings(settings)
        batches = [replace(b, queue=router.queue_for(b.model, b.loras)) if b.loras else b for b in batches]
    try:
        # Celery's own message format, published straight through kombu: send_task adds ~150 µs of
        # routing and signals per message, a third of a 100k campaign's submit time. kombu pipelines
        # the publishes where the transport can (Redis: one round trip per 1000 messages).
        with app.producer_or_acquire() as producer, producer.batch(1000):
            for batch in batches:
                message = amqp.create_task_message(
                    batch.task_id,
                    RENDER_TASK,
                    (),
                    {"image_ids": list(batch.image_ids), "model": batch.model},
                    countdown=countdown,
                    argsrepr=origin,
                    kwargsrepr=f"{batch.model} · {batch.label}",
                )
                producer.publish(
                    message.body,
                    exchange="",
                    routing_key=batch.queue or settings.queue_for(batch.model),
                    serializer="json",
                    headers=message.headers,
                    priority=batch.priority if priority is None else priority,
                    retry=False,
                    **message.properties,
                )
                count += 1
    except Exception as exc:  # broker down, bad URL…: the records are safe, say how to finish
        raise PublishError(
            f"{origin}: only {count} of {len(batches)} task(s) reached the broker ({type(exc).__name__}: {exc}); "
            "the images stay queued in the database and the reconciler every `farm worker` runs publishes "
            "them when the broker answers (`farm reconcile` does it now)"
        ) from exc
    if len(batches) <= SENT_EVENTS_MAX_TASKS and app.conf.worker_send_task_events:
        _announce(app, batches, settings, origin)
    return count


#: Publishes of up to this many tasks also send Flower a task-sent event per task, so an interactive
#: job shows up named and described while it waits; bulk publishes (campaigns) skip them (speed).
SENT_EVENTS_MAX_TASKS = 200


def _announce(app: Celery, batches: Sequence[Batch], settings: Settings, origin: str) -> None:
    """Task-sent events for Flower (best-effort: a refused event never fails a publish)."""
    try:
        with app.events.default_dispatcher() as dispatcher:
            for batch in batches:
                queue = batch.queue or settings.queue_for(batch.model)
                dispatcher.send(
                    "task-sent", uuid=batch.task_id, name=RENDER_TASK, args=origin,
                    kwargs=f"{batch.model} · {batch.label}", retries=0, eta=None, expires=None,
                    queue=queue, exchange="", routing_key=queue, root_id=batch.task_id, parent_id=None,
                )
    except Exception:  # noqa: BLE001
        pass


def publish_images(
    sessions: sessionmaker[Session],
    app: Celery,
    settings: Settings,
    image_ids: Iterable[str],
    *,
    origin: str,
    countdown: float | None = None,
) -> int:
    """Publish ``image_ids`` again under their recorded task ids, models and priorities."""
    ids = list(image_ids)
    if not ids:
        return 0
    grouped: dict[tuple[str, str, int], list[str]] = defaultdict(list)
    prompts: dict[tuple[str, str, int], str] = {}
    with sessions() as session:
        for start in range(0, len(ids), 10_000):  # psycopg refuses > 65,535 parameters in one statement
            rows = session.execute(
                select(ImageRecord.task_id, ImageRecord.model, CampaignRecord.priority, ImageRecord.id, ImageRecord.prompt)
                .outerjoin(CampaignRecord, CampaignRecord.id == ImageRecord.campaign_id)
                .where(ImageRecord.id.in_(ids[start : start + 10_000]))
                .order_by(ImageRecord.position)
            ).all()
            for task_id, model, priority, image_id, prompt in rows:
                key = (task_id, model, SUBMISSION_PRIORITY if priority is None else priority)
                grouped[key].append(image_id)
                prompts.setdefault(key, prompt)
    batches = [
        Batch(task_id=task_id, model=model, image_ids=tuple(members), priority=priority,
              label=f"{_excerpt(prompts[(task_id, model, priority)])} · {len(members)} image(s), published again")
        for (task_id, model, priority), members in grouped.items()
    ]
    sent = publish(app, batches, settings, origin=origin, countdown=countdown)
    with sessions.begin() as session:  # the outbox mark: these reached the broker
        for start in range(0, len(ids), 10_000):
            session.execute(
                update(ImageRecord)
                .where(ImageRecord.id.in_(ids[start : start + 10_000]), ImageRecord.publish_after.is_not(None))
                .values(publish_after=None)
            )
    return sent


def publish_queued(sessions: sessionmaker[Session], app: Celery, settings: Settings, *conditions: Any, origin: str) -> int:
    """Publish again every queued image matching ``conditions``; returns how many images."""
    with sessions() as session:
        ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.status == Status.queued.value, *conditions)))
    publish_images(sessions, app, settings, ids, origin=origin)
    return len(ids)


def publish_outbox(
    sessions: sessionmaker[Session], app: Celery, settings: Settings, *, older_than: float, limit: int = 50_000
) -> int:
    """Publish what was recorded and not published ``older_than`` seconds ago: images of submissions
    whose submitter never finished publishing (killed after its commit, broker down) and images queued
    again whose publish failed. Returns how many images were sent. Raises PublishError (broker away)."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    sent = 0
    with sessions() as session:
        unpublished = list(
            session.scalars(
                select(SubmissionRecord.id).where(
                    SubmissionRecord.published_at.is_(None), SubmissionRecord.created_at < cutoff
                )
            )
        )
        due = list(
            session.scalars(
                select(ImageRecord.id)
                .where(ImageRecord.status == Status.queued.value, ImageRecord.publish_after < cutoff)
                .limit(limit)
            )
        )
    for submission_id in unpublished:
        sent += publish_queued(
            sessions, app, settings, ImageRecord.submission_id == submission_id, origin=submission_id
        )
        mark_published(sessions, SubmissionRecord.id == submission_id)
    if due:
        publish_images(sessions, app, settings, due, origin="(outbox)")
        sent += len(due)
    return sent


def mark_published(sessions: sessionmaker[Session], *conditions: Any) -> None:
    """Record that every task of the submissions matching ``conditions`` reached the broker."""
    with sessions.begin() as session:
        session.execute(
            update(SubmissionRecord)
            .where(SubmissionRecord.published_at.is_(None), *conditions)
            .values(published_at=utcnow())
        )

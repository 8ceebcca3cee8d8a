"""Submissions: write the records in one transaction, then publish grouped work to Celery.

Images that share a batch key (model, size, steps, scheduler, guidance) are grouped into tasks of at
most ``max_batch_size`` images, which a worker renders as one GPU batch, each image with its own seed.
Each image row carries the id of the task that renders it, so a lost message can be published again
(:func:`requeue`) and a duplicate delivery is recognised (see ``farm.lifecycle``).
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from dataclasses import dataclass
from itertools import islice
from typing import Sequence

from celery import Celery
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from farm.dispatch.celery_app import RENDER_TASK
from farm.errors import FarmError, NotFound
from farm.db.tables import FINISHED, ImageRecord, Status, SubmissionRecord, utcnow
from farm.settings import Settings
from farm.request.spec import ImageSpec


@dataclass(frozen=True)
class Batch:
    """One task: images rendered together on one GPU."""

    task_id: str
    model: str
    image_ids: tuple[str, ...]
    label: str  # what Flower shows beside the task name
    loras: tuple[str, ...] = ()  # sha256s its images use (for affinity routing)
    queue: str | None = None  # a warm worker's own queue; None: the model's shared queue

    @classmethod
    def of(cls, task_id: str, image_ids: Sequence[str], spec: ImageSpec) -> "Batch":
        label = f"{len(image_ids)}× {spec.width}x{spec.height}, {spec.steps} steps, {spec.scheduler}, cfg {spec.guidance_scale}"
        if spec.mode != "txt2img":
            label += f", {spec.mode}"
        if spec.loras:
            label += f", {len(spec.loras)} LoRA(s)"
        return cls(task_id=task_id, model=spec.model, image_ids=tuple(image_ids), label=label,
                   loras=tuple(sha for sha, _ in spec.loras))


class PublishError(FarmError):
    """Raised when a submission was recorded but its work could not be handed to the broker.

    The images stay queued in the database: run ``farm requeue ID`` once the broker is reachable.
    """


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


def record_submission(
    sessions: sessionmaker[Session],
    specs: Sequence[ImageSpec],
    *,
    num_requests: int,
    settings: Settings,
    label: str | None = None,
    campaign_id: str | None = None,
    item_keys: Sequence[str] | None = None,
) -> tuple[str, list[Batch]]:
    """Write the submission and one row per image in one transaction; return the planned batches."""
    submission_id = str(uuid.uuid4())
    pairs = [(str(uuid.uuid4()), spec) for spec in specs]
    batches = plan_batches(pairs, settings.max_batch_size)
    task_of = {image_id: batch.task_id for batch in batches for image_id in batch.image_ids}
    now = utcnow()
    rows = [
        {
            "id": image_id,
            "submission_id": submission_id,
            "position": position,
            "request_index": spec.request_index,
            "model": spec.model,
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt,
            "seed": spec.seed,
            "steps": spec.steps,
            "guidance_scale": spec.guidance_scale,
            "width": spec.width,
            "height": spec.height,
            "scheduler": spec.scheduler,
            "params": spec.recorded(),
            "status": Status.queued.value,
            "attempts": 0,
            "task_id": task_of[image_id],
            "queued_at": now,
            "campaign_id": campaign_id,
            "item_key": item_keys[position] if item_keys is not None else None,
        }
        for position, (image_id, spec) in enumerate(pairs)
    ]
    with sessions.begin() as session:
        session.add(
            SubmissionRecord(
                id=submission_id,
                created_at=now,
                num_images=len(rows),
                num_requests=num_requests,
                label=label,
                campaign_id=campaign_id,
            )
        )
        session.flush()
        if session.bind.dialect.name == "postgresql":
            _copy_rows(session, rows)
        else:
            for chunk in _chunks(rows, 5000):
                session.execute(insert(ImageRecord), chunk)
    return submission_id, batches


def _copy_rows(session: Session, rows: list[dict]) -> None:
    """PostgreSQL's COPY, ~5× faster than a multi-row INSERT for a 100k-image campaign."""
    if not rows:
        return
    columns = list(rows[0])
    cursor = session.connection().connection.dbapi_connection.cursor()
    with cursor.copy(f"COPY images ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([json.dumps(row[c]) if c == "params" else row[c] for c in columns])


def publish(
    app: Celery,
    batches: Sequence[Batch],
    settings: Settings,
    *,
    submission_id: str,
    sessions: sessionmaker[Session] | None = None,
    priority: int = 0,
    whole_submission: str | None = None,
) -> int:
    """Send one task message per batch to its model's queue, then mark the images published.

    Messages carry ids and plain values. ``priority`` 0 is served first (Redis), 9 last.
    ``whole_submission``: the batches are all of that submission's queued work: mark it published.
    """
    count = 0
    amqp = app.amqp
    if any(batch.loras for batch in batches):
        from dataclasses import replace

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
                    argsrepr=f"submission={submission_id}",
                    kwargsrepr=f"{{model: {batch.model!r}, images: {batch.label}}}",
                )
                producer.publish(
                    message.body,
                    exchange="",
                    routing_key=batch.queue or settings.queue_for(batch.model),
                    serializer="json",
                    headers=message.headers,
                    priority=priority,
                    retry=False,
                    **message.properties,
                )
                count += 1
    except Exception as exc:  # broker down, bad URL…: the records are safe, say how to finish
        raise PublishError(
            f"submission {submission_id} is recorded but only {count} of its tasks reached the broker "
            f"({type(exc).__name__}: {exc}); its images stay queued: run `farm requeue {submission_id}` "
            "once the broker is reachable"
        ) from exc
    if sessions is not None and whole_submission is not None:
        mark_published(sessions, whole_submission)
    return count


def mark_published(sessions: sessionmaker[Session], submission_id: str) -> None:
    """Record that every task of a submission reached the broker (one row, however many images)."""
    with sessions.begin() as session:
        session.execute(
            update(SubmissionRecord).where(SubmissionRecord.id == submission_id).values(published_at=utcnow())
        )


def requeue(sessions: sessionmaker[Session], app: Celery, settings: Settings, submission_id: str) -> int:
    """Publish again every task of ``submission_id`` that still has queued images.

    Safe to run at any time: a task delivered twice renders each image once (``farm.lifecycle``).
    Returns the number of tasks published.
    """
    with sessions() as session:
        if session.get(SubmissionRecord, submission_id) is None:
            raise NotFound(f"no submission {submission_id!r}")
        rows = session.execute(
            select(ImageRecord.task_id, ImageRecord.model, ImageRecord.id)
            .where(ImageRecord.submission_id == submission_id, ImageRecord.status == Status.queued.value)
            .order_by(ImageRecord.position)
        ).all()
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for task_id, model, image_id in rows:
        grouped[(task_id, model)].append(image_id)
    return publish(
        app, regrouped(grouped), settings, submission_id=submission_id, sessions=sessions, whole_submission=submission_id
    )


def regrouped(grouped: dict[tuple[str, str], list[str]]) -> list[Batch]:
    """Batches for ``{(task_id, model): image ids}`` published again under their original task ids."""
    return [
        Batch(task_id=task_id, model=model, image_ids=tuple(ids), label=f"{len(ids)} image(s), published again")
        for (task_id, model), ids in grouped.items()
    ]


def counts(session: Session, submission_id: str) -> dict[str, int]:
    """Images of a submission by status (every status present, zeros included)."""
    if session.get(SubmissionRecord, submission_id) is None:
        raise NotFound(f"no submission {submission_id!r}: check the id, or FARM_DATABASE_URL")
    found = dict(
        session.execute(
            select(ImageRecord.status, func.count())
            .where(ImageRecord.submission_id == submission_id)
            .group_by(ImageRecord.status)
        ).all()
    )
    return {status.value: int(found.get(status.value, 0)) for status in Status}


def cancel(sessions: sessionmaker[Session], submission_id: str) -> int:
    """Cancel every image not yet finished. Running batches stop at their next step. Returns the count."""
    with sessions.begin() as session:
        if session.get(SubmissionRecord, submission_id) is None:
            raise NotFound(f"no submission {submission_id!r}")
        result = session.execute(
            update(ImageRecord)
            .where(
                ImageRecord.submission_id == submission_id,
                ImageRecord.status.not_in([s.value for s in FINISHED]),
            )
            .values(status=Status.canceled.value, finished_at=utcnow(), error="canceled by the user")
        )
        return result.rowcount


def _chunks(rows: list, size: int):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]

"""Claims: how a worker takes images before rendering and records each result exactly once.

A delivery claims the images of its task that are queued (or whose last claim's lease expired: that
worker died) under a fresh token, renews the lease while it renders, and records a result only where
the row still carries its token. So a task delivered twice, or a dead worker's task redelivered to
another, renders and records each image once; canceled images are never overwritten.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Sequence

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from farm.db.tables import ImageRecord, Status, utcnow

RUNNING = Status.running.value
QUEUED = Status.queued.value


@dataclass
class Claim:
    token: str
    images: list[ImageRecord] = field(default_factory=list)
    #: images of the task that another live claim holds, and how long until the first lease ends
    held_elsewhere: list[str] = field(default_factory=list)
    wait_seconds: float = 0.0
    #: images given up on because they were claimed too often (each time their worker died)
    given_up: list[str] = field(default_factory=list)


def claim(
    sessions: sessionmaker[Session],
    image_ids: Sequence[str],
    *,
    worker: str,
    lease_seconds: float,
    max_attempts: int,
) -> Claim:
    now = utcnow()
    token = str(uuid.uuid4())
    with sessions.begin() as session:
        session.execute(
            update(ImageRecord)
            .where(
                ImageRecord.id.in_(list(image_ids)),
                or_(
                    ImageRecord.status == QUEUED,
                    and_(ImageRecord.status == RUNNING, ImageRecord.lease_expires_at < now),
                ),
            )
            .values(
                status=RUNNING,
                claim_token=token,
                worker=worker,
                started_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=ImageRecord.attempts + 1,
            )
        )
        mine = list(
            session.scalars(
                select(ImageRecord).where(ImageRecord.claim_token == token).order_by(ImageRecord.position)
            )
        )
        result = Claim(token=token)
        for image in mine:
            if image.attempts > max_attempts:
                image.status = Status.failed.value
                image.finished_at = now
                image.error = (
                    f"gave up after {max_attempts} attempts; the last one: {image.error}"
                    if image.error
                    else f"gave up after {max_attempts} attempts: the worker rendering it stopped each time "
                    "(killed, out of memory, or lost)"
                )
                result.given_up.append(image.id)
            else:
                result.images.append(image)
        others = session.execute(
            select(ImageRecord.id, ImageRecord.lease_expires_at).where(
                ImageRecord.id.in_(list(image_ids)),
                ImageRecord.status == RUNNING,
                ImageRecord.claim_token != token,
            )
        ).all()
        if others:
            result.held_elsewhere = [image_id for image_id, _ in others]
            first_expiry = min(expiry for _, expiry in others)
            result.wait_seconds = max(0.0, (first_expiry - now).total_seconds())
        session.expunge_all()
    return result


def heartbeat(sessions: sessionmaker[Session], token: str, lease_seconds: float) -> int:
    """Renew the lease; returns how many images the claim still holds (0: all canceled)."""
    with sessions.begin() as session:
        return session.execute(
            update(ImageRecord)
            .where(ImageRecord.claim_token == token, ImageRecord.status == RUNNING)
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        ).rowcount


def record_success(
    sessions: sessionmaker[Session], token: str, image_id: str, **values: Any
) -> bool:
    """Mark one image succeeded with ``values`` (storage_key, gpu_seconds…); False if the claim was lost."""
    with sessions.begin() as session:
        return bool(
            session.execute(
                update(ImageRecord)
                .where(ImageRecord.id == image_id, ImageRecord.claim_token == token, ImageRecord.status == RUNNING)
                .values(status=Status.succeeded.value, finished_at=utcnow(), lease_expires_at=None, error=None, **values)
            ).rowcount
        )


def record_failure(sessions: sessionmaker[Session], token: str, image_ids: Sequence[str], error: str) -> int:
    with sessions.begin() as session:
        return session.execute(
            update(ImageRecord)
            .where(ImageRecord.id.in_(list(image_ids)), ImageRecord.claim_token == token, ImageRecord.status == RUNNING)
            .values(status=Status.failed.value, finished_at=utcnow(), lease_expires_at=None, error=error[:4000])
        ).rowcount


def release(
    sessions: sessionmaker[Session],
    token: str,
    *,
    note: str | None = None,
    image_ids: Sequence[str] | None = None,
    count_attempt: bool = False,
) -> int:
    """Give the claim's unfinished images (or only ``image_ids`` of them) back to the queue.

    By default the attempt is not counted (an infrastructure error before any GPU work, not the
    images' fault). ``count_attempt``: it was rendered and could not be stored; after
    ``max_attempts`` such rounds :func:`claim` fails the image with ``note`` as the reason."""
    where = [ImageRecord.claim_token == token, ImageRecord.status == RUNNING]
    if image_ids is not None:
        where.append(ImageRecord.id.in_(list(image_ids)))
    with sessions.begin() as session:
        return session.execute(
            update(ImageRecord)
            .where(*where)
            .values(
                status=QUEUED,
                claim_token=None,
                lease_expires_at=None,
                worker=None,
                started_at=None,
                attempts=ImageRecord.attempts if count_attempt else ImageRecord.attempts - 1,
                error=note,
            )
        ).rowcount


def take_back_expired(sessions: sessionmaker[Session], *, grace_seconds: float = 0.0) -> dict[tuple[str, str], list[str]]:
    """Queue again the images whose worker stopped renewing its lease (it died with its message).

    Returns ``{(task_id, model): [image ids]}`` for the caller to publish again.
    """
    cutoff = utcnow() - timedelta(seconds=grace_seconds)
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    with sessions.begin() as session:
        stale = session.execute(
            select(ImageRecord.id, ImageRecord.claim_token, ImageRecord.task_id, ImageRecord.model).where(
                ImageRecord.status == RUNNING, ImageRecord.lease_expires_at < cutoff
            )
        ).all()
        for image_id, token, task_id, model in stale:
            taken = session.execute(
                update(ImageRecord)
                .where(
                    ImageRecord.id == image_id,
                    ImageRecord.claim_token == token,
                    ImageRecord.status == RUNNING,
                    ImageRecord.lease_expires_at < cutoff,
                )
                .values(status=QUEUED, claim_token=None, lease_expires_at=None)
            ).rowcount
            if taken:
                grouped[(task_id, model)].append(image_id)
    return dict(grouped)

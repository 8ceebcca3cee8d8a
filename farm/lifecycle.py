"""An image's life, in one place: every status transition is here, each a guarded update.

    (created) ──record──▶ queued ◀──release / take_back_expired / resume / retry_failed──┐
                          │  ▲                                                           │
                 claim ───┘  └── pause ── paused                                         │
                  ▼                                                                      │
               running ──record_success──▶ succeeded | filtered (safety: drop)           │
                  │ └─────record_failure──▶ failed ──────────────────────────────────────┘
                  └──────────cancel───────▶ canceled  (also from queued and paused)

Outbox: every transition *to* queued (release, take_back_expired, resume, retry_failed) sets the image's
``publish_after`` in the same transaction; :func:`farm.dispatch.publish.publish_images` clears it
once the message reached the broker. Whatever stays marked (the caller died, the broker refused) is
published by the reconciler (:mod:`farm.reconciler`). A new submission's mark is its own
``published_at`` (NULL until every task of it reached the broker).

Attempts: a claim counts one attempt; giving the images back for a reason that is not theirs
(a warm shutdown, the database or storage away) takes it back. So only a worker that vanished
mid-render (killed, out of memory) counts, and :func:`claim` fails an image past ``max_attempts``.

Claims: a delivery claims the images of its task that are queued (or whose last claim's lease expired: that
worker died) under a fresh token, renews the lease while it renders, and records a result only where
the row still carries its token. So a task delivered twice, or a dead worker's task redelivered to
another, renders and records each image once; canceled images are never overwritten.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from sqlalchemy import and_, bindparam, case, func, insert, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from farm import cross_job
from farm.db.tables import FINISHED, ImageRecord, Status, SubmissionRecord, utcnow
from farm.errors import NotFound
from farm.request.spec import ImageSpec
from farm.settings import Settings

if TYPE_CHECKING:
    from farm.dispatch.publish import Batch

__all__ = [
    "Claim", "cancel", "claim", "counts", "heartbeat", "pause", "record", "record_failure", "record_success",
    "record_success_many",
    "release", "report_progress", "resume", "retry_failed", "steps", "submission_counts", "take_back_expired",
]

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
    #: images of other tasks this claim took to fill its chunk (cross-job batching); also in ``images``
    topped_up: list[str] = field(default_factory=list)


def claim(
    sessions: sessionmaker[Session],
    image_ids: Sequence[str],
    *,
    worker: str,
    lease_seconds: float,
    max_attempts: int,
    top_up: Callable[[int, int], int] | None = None,
) -> Claim:
    """Claim the task's images (``image_ids``) that are queued, or whose last claim's lease expired.

    ``top_up(width, height)``: the worker's chunk size at that resolution. When given, the claim is
    topped up in the same transaction with queued images of *other* tasks that share the batch key
    (:attr:`~farm.request.spec.ImageSpec.batch_key`, the one rule for what may share a GPU batch)
    until its last chunk is full (see :func:`farm.cross_job.top_up`); they are in ``images`` (after the task's own)
    and in ``topped_up``, and their own task messages later find them running or done and skip them.
    """
    now = utcnow()
    token = str(uuid.uuid4())
    claimed = dict(
        status=RUNNING,
        claim_token=token,
        worker=worker,
        started_at=now,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        attempts=ImageRecord.attempts + 1,
        publish_after=None,
    )
    with sessions.begin() as session:
        # one statement: UPDATE … RETURNING the claimed rows (PostgreSQL; SQLite ≥ 3.35)
        mine = sorted(
            session.scalars(
                update(ImageRecord)
                .where(
                    ImageRecord.id.in_(list(image_ids)),
                    or_(
                        ImageRecord.status == QUEUED,
                        and_(ImageRecord.status == RUNNING, ImageRecord.lease_expires_at < now),
                    ),
                )
                .values(**claimed)
                .returning(ImageRecord)
                .execution_options(synchronize_session=False)
            ).all(),
            key=lambda image: (image.position, image.id),
        )
        result = Claim(token=token)
        if top_up is not None and mine:
            extra = cross_job.top_up(session, mine, top_up, claimed)
            mine += extra
            result.topped_up = [image.id for image in extra]
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
        given_up = set(result.given_up)
        result.topped_up = [image_id for image_id in result.topped_up if image_id not in given_up]
        # images of the task another live claim holds; not those this worker holds itself (e.g. one
        # of its earlier claims topped them up and is uploading them): it is alive, and if it dies
        # the lease sweeper queues them again
        own = {image.id for image in mine}
        others = [] if own.issuperset(image_ids) else session.execute(  # every image of the task is ours: none elsewhere
            select(ImageRecord.id, ImageRecord.lease_expires_at).where(
                ImageRecord.id.in_(list(image_ids)),
                ImageRecord.status == RUNNING,
                ImageRecord.claim_token != token,
                or_(ImageRecord.worker.is_(None), ImageRecord.worker != worker),
            )
        ).all()
        if others:
            result.held_elsewhere = [image_id for image_id, _ in others]
            first_expiry = min(expiry for _, expiry in others)
            result.wait_seconds = max(0.0, (first_expiry - now).total_seconds())
        session.flush()  # the images given up on (no later query autoflushes them when all were ours)
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


def _success_where(token: str, adopt: bool, now: Any) -> Any:
    """Which rows a success may be recorded on: still held by claim ``token`` and running; with
    ``adopt`` also rows nobody rendered since (queued or paused again, or running under an expired lease)."""
    mine = and_(ImageRecord.claim_token == token, ImageRecord.status == RUNNING)
    if adopt:
        mine = or_(
            mine,
            ImageRecord.status.in_([QUEUED, Status.paused.value]),
            and_(ImageRecord.status == RUNNING, ImageRecord.lease_expires_at < now),
        )
    return mine


def _success_values(filtered: str | None, values: Mapping[str, Any]) -> dict[str, Any]:
    """The per-image columns a success writes: status (``succeeded``, or ``filtered`` with the
    reason as ``error``) and ``values``."""
    status, error = (Status.succeeded.value, None) if filtered is None else (Status.filtered.value, filtered[:4000])
    return {"status": status, "error": error, **values}


def record_success(
    sessions: sessionmaker[Session],
    token: str,
    image_id: str,
    *,
    adopt: bool = False,
    filtered: str | None = None,
    **values: Any,
) -> bool:
    """Mark one image succeeded with ``values`` (storage_key, gpu_seconds, flagged, safety…); False if
    the claim was lost.

    ``filtered``: the image rendered but the safety checker withheld it (policy ``drop``): it ends
    ``filtered`` (finished, not failed, never retried) with this reason as its ``error``, and no PNG.

    ``adopt``: the image was rendered under ``token`` by an earlier process of this worker and kept in
    its spool; record it also if nobody rendered it since — it is queued again, or running under a
    lease that has expired — so a restart after a storage outage never renders it twice.

    Many images of one claim: :func:`record_success_many` (one statement on PostgreSQL)."""
    now = utcnow()
    with sessions.begin() as session:
        return bool(
            session.execute(
                update(ImageRecord)
                .where(ImageRecord.id == image_id, _success_where(token, adopt, now))
                .values(
                    finished_at=now, lease_expires_at=None, claim_token=token, publish_after=None,
                    **_success_values(filtered, values),
                )
            ).rowcount
        )


def record_success_many(
    sessions: sessionmaker[Session],
    token: str,
    images: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    adopt: bool = False,
) -> list[str]:
    """:func:`record_success` for many images of claim ``token`` in ONE transaction: ``images`` are
    ``(image_id, values)`` pairs, each ``values`` what :func:`record_success` takes as keywords
    (``storage_key``, ``gpu_seconds``…, ``filtered``). Returns the ids recorded; the others' claim was
    lost (canceled, or taken back and claimed again) and they are left as they are, exactly as
    :func:`record_success` would.

    On PostgreSQL one ``UPDATE … FROM (VALUES …) RETURNING id`` per set of columns (a chunk's images
    share one set, so one statement per chunk); elsewhere (SQLite) one UPDATE per image, still one
    transaction."""
    if not images:
        return []
    now = utcnow()
    rows = [(image_id, _success_values(dict(values).pop("filtered", None), _without(values, "filtered")))
            for image_id, values in images]
    recorded: list[str] = []
    with sessions.begin() as session:
        if session.bind.dialect.name != "postgresql":
            for image_id, columns in rows:
                if session.execute(
                    update(ImageRecord)
                    .where(ImageRecord.id == image_id, _success_where(token, adopt, now))
                    .values(finished_at=now, lease_expires_at=None, claim_token=token, publish_after=None, **columns)
                ).rowcount:
                    recorded.append(image_id)
            return recorded
        groups: dict[tuple[str, ...], list[tuple[str, dict[str, Any]]]] = {}
        for image_id, columns in rows:
            groups.setdefault(tuple(sorted(columns)), []).append((image_id, columns))
        for names, group in groups.items():
            recorded += _update_from_values(session, token, adopt, now, names, group)
    return recorded


def _without(values: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != name}


def _update_from_values(
    session: Session, token: str, adopt: bool, now: Any, names: tuple[str, ...], group: list[tuple[str, dict[str, Any]]]
) -> list[str]:
    """One ``UPDATE images … FROM (VALUES (id, col…), …) AS v WHERE images.id = v.id AND <held>
    RETURNING images.id`` (PostgreSQL): each value bound with its column's type and cast to it, so a
    column NULL in every row (or JSON) keeps its type."""
    table = ImageRecord.__table__
    dialect = session.bind.dialect
    for name in names:
        if name not in table.c or name in ("id", "claim_token"):
            raise TypeError(f"record_success_many: {name!r} is not a column an image's success may set")
    columns = ("id",) + names
    rows_sql, params = [], []
    for n, (image_id, values) in enumerate(group):
        cells = []
        for name in columns:
            column = table.c[name]
            param = f"v{n}_{name}"
            cells.append(f"CAST(:{param} AS {column.type.compile(dialect=dialect)})")
            params.append(bindparam(param, image_id if name == "id" else values[name], type_=column.type))
        rows_sql.append(f"({', '.join(cells)})")
    held = "i.claim_token = :token AND i.status = :running"
    binds = [bindparam("token", token), bindparam("running", RUNNING), bindparam("now", now, type_=table.c.finished_at.type)]
    if adopt:
        held = (f"({held}) OR i.status IN (:queued, :paused) "
                "OR (i.status = :running AND i.lease_expires_at < :now)")
        binds += [bindparam("queued", QUEUED), bindparam("paused", Status.paused.value)]
    assignments = ", ".join(f"{name} = v.{name}" for name in names)
    statement = text(
        f"UPDATE images AS i SET finished_at = :now, lease_expires_at = NULL, claim_token = :token, "
        f"publish_after = NULL, {assignments} "
        f"FROM (VALUES {', '.join(rows_sql)}) AS v({', '.join(columns)}) "
        f"WHERE i.id = v.id AND ({held}) RETURNING i.id"
    ).bindparams(*params, *binds)
    return list(session.execute(statement).scalars())


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
    """Give the claim's unfinished images (or only ``image_ids`` of them) back to the queue, marked
    for publishing (the caller publishes them; the reconciler does if it cannot).

    By default the attempt is not counted (a warm shutdown, an infrastructure error: not the
    images' fault). ``count_attempt``: the images themselves failed the render; after
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
                steps_done=None,
                publish_after=utcnow(),
            )
        ).rowcount


def take_back_expired(sessions: sessionmaker[Session], *, grace_seconds: float = 0.0) -> list[str]:
    """Queue again the images whose worker stopped renewing its lease (it died with its message).

    Returns their ids, for the caller to publish again (``farm.dispatch.publish.publish_images``).
    """
    cutoff = utcnow() - timedelta(seconds=grace_seconds)
    taken: list[str] = []
    with sessions.begin() as session:
        stale = session.execute(
            select(ImageRecord.id, ImageRecord.claim_token).where(
                ImageRecord.status == RUNNING, ImageRecord.lease_expires_at < cutoff
            )
        ).all()
        for image_id, token in stale:
            if session.execute(
                update(ImageRecord)
                .where(
                    ImageRecord.id == image_id,
                    ImageRecord.claim_token == token,
                    ImageRecord.status == RUNNING,
                    ImageRecord.lease_expires_at < cutoff,
                )
                .values(status=QUEUED, claim_token=None, lease_expires_at=None, steps_done=None, publish_after=utcnow())
            ).rowcount:
                taken.append(image_id)
    return taken


# -- creating images ------------------------------------------------------------------------------

def record(
    sessions: sessionmaker[Session],
    specs: Sequence[ImageSpec],
    *,
    num_requests: int,
    settings: Settings,
    label: str | None = None,
    campaign_id: str | None = None,
    item_keys: Sequence[str] | None = None,
    status: Status = Status.queued,
) -> tuple[str, list[Batch]]:
    """Create images: the submission and one row per image (``status`` queued, or paused with its
    campaign), in one transaction; returns the submission id and the planned task batches."""
    submission_id = str(uuid.uuid4())
    pairs = [(str(uuid.uuid4()), spec) for spec in specs]
    from farm.dispatch.publish import plan_batches

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
            "status": status.value,
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


def _chunks(rows: list, size: int):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


# -- the user's transitions -----------------------------------------------------------------------

def cancel(sessions: sessionmaker[Session], *where: Any, reason: str) -> int:
    """Cancel every unfinished image matching ``where``: queued and paused ones are dropped, running
    batches stop at their next step (their heartbeat finds the claim gone). Returns the count."""
    with sessions.begin() as session:
        return session.execute(
            update(ImageRecord)
            .where(*where, ImageRecord.status.not_in([s.value for s in FINISHED]))
            .values(status=Status.canceled.value, finished_at=utcnow(), lease_expires_at=None, error=reason)
        ).rowcount


def pause(sessions: sessionmaker[Session], *where: Any) -> int:
    """Hold back the queued images matching ``where`` (running ones finish); returns how many."""
    return _move(sessions, where, Status.queued, Status.paused)


def resume(sessions: sessionmaker[Session], *where: Any) -> int:
    """Queue the held (paused) images matching ``where`` again; returns how many."""
    return _move(sessions, where, Status.paused, Status.queued, publish_after=utcnow())


def retry_failed(sessions: sessionmaker[Session], *where: Any) -> int:
    """Queue the failed images matching ``where`` again with fresh attempts; returns how many."""
    return _move(
        sessions, where, Status.failed, Status.queued, attempts=0, error=None, finished_at=None, publish_after=utcnow()
    )


def _move(sessions: sessionmaker[Session], where: Iterable[Any], old: Status, new: Status, **values: Any) -> int:
    with sessions.begin() as session:
        return session.execute(
            update(ImageRecord).where(*where, ImageRecord.status == old.value).values(status=new.value, **values)
        ).rowcount


def counts(session: Session, *where: Any) -> dict[str, int]:
    """Images matching ``where`` by status (every status present, zeros included)."""
    found = dict(
        session.execute(select(ImageRecord.status, func.count()).where(*where).group_by(ImageRecord.status)).all()
    )
    return {status.value: int(found.get(status.value, 0)) for status in Status}


def submission_counts(session: Session, submission_id: str) -> dict[str, int]:
    """A submission's images by status; :class:`~farm.errors.NotFound` if there is no such submission."""
    if session.get(SubmissionRecord, submission_id) is None:
        raise NotFound(f"no submission {submission_id!r}: check the id, or FARM_DATABASE_URL")
    return counts(session, ImageRecord.submission_id == submission_id)


def steps(session: Session, *where: Any) -> tuple[int, int]:
    """``(done, total)`` denoising steps of the images matching ``where``: a finished image counts
    all its steps, a running one as far as its worker reported (:func:`report_progress`)."""
    finished = [s.value for s in FINISHED]
    done, total = session.execute(
        select(
            func.sum(
                case(
                    (ImageRecord.status.in_(finished), ImageRecord.steps),
                    (ImageRecord.status == RUNNING, func.coalesce(ImageRecord.steps_done, 0)),
                    else_=0,
                )
            ),
            func.sum(ImageRecord.steps),
        ).where(*where)
    ).one()
    return int(done or 0), int(total or 0)


def report_progress(sessions: sessionmaker[Session], token: str, image_ids: Sequence[str], done: int, total: int) -> int:
    """Record that a claim's rendering images are ``done`` of ``total`` denoising steps along
    (scaled to each image's own steps); returns how many images the claim still holds."""
    with sessions.begin() as session:
        return session.execute(
            update(ImageRecord)
            .where(ImageRecord.claim_token == token, ImageRecord.status == RUNNING, ImageRecord.id.in_(list(image_ids)))
            .values(steps_done=ImageRecord.steps * int(done) / max(1, int(total)))
        ).rowcount

"""Campaigns: many images from a prompt file × sweeps, resumable, idempotent, controllable.

Submitting reads the input once, streaming, inside ONE database transaction: each row is checked
and expanded (``farm.request.intake``), and its images are written chunk by chunk as they come. A
bad line, a repeated row id or a sweep past the cap anywhere in the input raises before the commit,
so the transaction is rolled back: nothing is written (not even the campaign's row), nothing is
queued. Only after the commit is anything published, chunk by chunk, and each chunk's submission is
marked published (``published_at``) once its messages reached the broker. Each image has a stable
``item_key`` (row id × sweep values × index), so submitting the same file again, or after the
submitter was killed half way, adds only what is missing, and publishes what was recorded but never
reached the broker. The sweep product is counted (multiplied) before it is built, so a sweep past
the cap is refused at once.

On SQLite the transaction holds the database's write lock for the whole pass (about 10 s per
100k images): embedded workers wait for it (busy timeout 60 s). PostgreSQL has no such limit.

This module holds submitting: :class:`Campaign` (the handle ``farm.campaign(name)`` returns) and
:class:`SubmitReport`. Control and status (pause, resume, cancel, retry failed, status, wait, and
reading the finished images back) live in :mod:`farm.campaigns.control`: ``Campaign`` inherits them
from :class:`~farm.campaigns.control.CampaignControl`, and :class:`CampaignStatus` is re-exported here.
"""

from __future__ import annotations

import logging

import hashlib
import json
import math
import queue
import threading
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from sqlalchemy import func, select

from farm import lifecycle
from farm.campaigns.control import CampaignControl, CampaignStatus
from farm.campaigns.prompt_files import Row, combinations, finish_row, parse_sweeps, read_rows, row_id
from farm.db.tables import CampaignRecord, CampaignState, ImageRecord, Status, SubmissionRecord
from farm.dispatch.publish import mark_published, publish, publish_queued
from farm.errors import PublishError, ValidationError
from farm.request.spec import ImageSpec
from farm.request.text import check_name, shown, text_problem

if TYPE_CHECKING:
    from farm.request.intake import Intake
    from farm.services import Services

__all__ = ["DEFAULT_SECONDS_PER_STEP_512", "Campaign", "CampaignControl", "CampaignStatus", "SubmitReport"]

#: Seconds per denoising step of one 512×512 image, used for --dry-run estimates until the farm
#: has rendered something with the model (then its recorded GPU seconds are used).
DEFAULT_SECONDS_PER_STEP_512 = 0.02


@dataclass
class SubmitReport:
    campaign: str
    total: int  # images the input expands to
    new: int = 0  # recorded and queued by this run
    existing: int = 0  # already in the campaign
    published_again: int = 0  # recorded earlier, never published (a killed submitter): queued now
    estimated_gpu_seconds: float = 0.0
    dry_run: bool = False
    #: the broker refused after the commit: recorded, and published by the reconciler when it answers
    broker_error: str | None = None

    def __str__(self) -> str:
        if self.dry_run:
            return (
                f"{self.campaign}: {self.total} image(s); estimated GPU time "
                f"{timedelta(seconds=round(self.estimated_gpu_seconds))} (dry run: nothing submitted)"
            )
        return (
            f"{self.campaign}: {self.total} image(s): {self.new} new, {self.existing} already there"
            + (f", {self.published_again} queued again" if self.published_again else "")
            + (f"; not queued yet, the broker refused ({self.broker_error}): recorded, the farm queues them "
               "when it answers" if self.broker_error else "")
        )


log = logging.getLogger("farm.campaigns")

#: Images whose planned task batches are held in memory until the commit, to be published as
#: planned (labels, LoRA affinity routing). Chunks past it are published from the database after the
#: commit (``publish_queued``), so a 5M-image campaign does not hold 5M image ids in memory.
HOLD_IMAGES = 400_000
#: Longest campaign name: its submissions are labelled ``campaign:NAME`` in a 255-character column.
NAME_MAX_CHARS = 200


class _InTransaction:
    """Hands :func:`farm.lifecycle.record` the open session as its sessionmaker, so each chunk it
    records joins the submit's one transaction instead of committing on its own."""

    def __init__(self, session):
        self._session = session

    @contextmanager
    def begin(self):
        yield self._session

    def __call__(self):
        return nullcontext(self._session)


class _Writer:
    """Writes the chunks of one submit on a thread of its own, in the submit's open transaction.

    The checking of rows (Python, holding the GIL) and the database's work on the previous chunk
    (PostgreSQL's COPY in the server, SQLite's inserts in C without the GIL) overlap instead of
    taking turns. At most two chunks wait, so memory stays bounded. Only this thread touches the
    session until the ``with`` block ends, which waits for the last write; a write's error is
    raised in the submitting thread, and an error there stops the writer before the rollback.
    """

    _STOP = object()

    def __init__(self, write: Callable[[Any], None]):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._stopping = False  # the submit failed: what is still queued is not written
        self._thread = threading.Thread(target=self._run, name="farm-campaign-writer", daemon=True)

    def __enter__(self) -> "_Writer":
        self._thread.start()
        return self

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not self._STOP:
            if self._error is None and not self._stopping:  # after an error, drain without writing
                try:
                    self._write(chunk)
                except BaseException as exc:  # noqa: BLE001 - raised again in the submitting thread
                    self._error = exc

    def put(self, chunk: Any) -> None:
        if self._error is not None:
            self._raise()
        self._queue.put(chunk)

    def _raise(self) -> None:
        error, self._error = self._error, None
        raise error  # type: ignore[misc]

    def __exit__(self, kind, exc, tb) -> None:
        self._stopping = kind is not None
        self._queue.put(self._STOP)
        self._thread.join()  # the last write is done (or stopped) before a commit or rollback
        if kind is None and self._error is not None:
            self._raise()


@dataclass
class _Chunk:
    """A recorded chunk, published after the commit: its batches, or None (publish from the database)."""

    submission_id: str
    batches: list | None


class Campaign(CampaignControl):
    """A handle on a named campaign (created by its first ``submit``).

    ``submit`` is here; control, status and the finished images come from
    :class:`~farm.campaigns.control.CampaignControl`.
    """

    def __init__(self, services: "Services", name: str, *, intake: Callable[[], "Intake"]):
        if not isinstance(name, str) or text_problem(name):
            raise ValidationError("name", shown(name), "must be text (valid Unicode, no NUL)" if isinstance(name, str) else "must be a string")
        super().__init__(services, name)
        #: makes the request path for one submit (``Farm.intake``): model defaults, inputs, LoRAs, checks
        self._intake = intake

    # -- submit -------------------------------------------------------------------------------
    def submit(
        self,
        source: str | Path | Iterable[dict[str, Any]],
        *,
        sweeps: list[str] | dict[str, list[Any]] | None = None,
        dry_run: bool = False,
        priority: int | None = None,
        on_total: Callable[[SubmitReport], None] | None = None,
        in_transaction: Callable[[Any, CampaignRecord, bool], None] | None = None,
    ) -> SubmitReport:
        """Expand ``source`` (a .jsonl/.csv/.parquet path, or dicts) × ``sweeps`` and queue what is new.

        Each row is a request like any other (``farm.request.intake``): the model's defaults, LoRAs
        (``loras``: names with weights), init images and masks (paths relative to the prompt file,
        or URIs of the farm's storage), strength, clip skip… A row and the same plain request give
        identical parameters. ``on_total`` gets the report with the count and GPU-time estimate once
        the whole input is checked, before anything is committed or queued.
        ``in_transaction(session, record, created)`` is called in the submit's one transaction right
        after the campaign's row is found or made (``created``: made now), before any image is
        written: what it writes (``farm api``'s owner row) is committed with the campaign or not at
        all, and if it raises nothing is written and nothing is queued.
        """
        check_name("campaign", self.name, max_chars=NAME_MAX_CHARS)
        if priority is not None and (priority.__class__ is not int or not 0 <= priority <= 9):
            raise ValidationError("priority", shown(priority), "must be an integer between 0 (first) and 9 (last)")
        settings = self._services.settings
        cap = settings.limits.max_campaign_images
        sweep_values = parse_sweeps(sweeps or [])
        product = math.prod(len(values) for values in sweep_values.values())
        if product > cap:  # counted before the product is built
            raise ValidationError(
                "sweeps", f"{product} combinations", f"every row would expand past the cap of {cap} images "
                "(FARM_LIMITS__MAX_CAMPAIGN_IMAGES)",
            )
        combos = combinations(sweep_values)
        intake = self._intake()
        per_step = self._seconds_per_step()
        report = SubmitReport(campaign=self.name, total=0, dry_run=dry_run)
        if dry_run:
            for chunk in self._chunks(intake, source, combos, cap, settings.campaign_chunk_size):
                self._count(report, chunk, per_step)
            if on_total is not None:
                on_total(report)
            return report

        sessions = self._services.sessions
        with sessions.begin() as session:  # one transaction: any error below rolls every write back
            created = in_transaction is not None and session.scalar(
                select(CampaignRecord.id).where(CampaignRecord.name == self.name)
            ) is None
            record = self._ensure(session, priority)
            if in_transaction is not None:
                in_transaction(session, record, created)
                session.flush()
            fresh = not self._has_images(session, record)  # a new campaign: no key can exist yet
            recorded: list[_Chunk] = []
            held = 0

            def write(chunk: list[tuple[str, ImageSpec]]) -> None:
                nonlocal held
                written = self._write_chunk(session, record, chunk, report, fresh=fresh)
                if written is not None:
                    submission_id, batches, count = written
                    keep = held + count <= HOLD_IMAGES
                    held += count if keep else 0
                    recorded.append(_Chunk(submission_id, batches if keep else None))

            # the database writes chunk N (on the writer's thread) while chunk N+1 is checked here
            with _Writer(write) as writer:
                for chunk in self._chunks(intake, source, combos, cap, settings.campaign_chunk_size):
                    self._count(report, chunk, per_step)
                    writer.put(chunk)
            if on_total is not None:  # the count and estimate, before anything is committed or queued
                on_total(report)
            intake.upload_inputs()  # every row is valid: store the input images (once each, by content)
        # committed: now queue, chunk by chunk, and mark each chunk published once it is; a broker that
        # refuses loses nothing (the outbox: farm.reconciler publishes what stays unpublished)
        try:
            if record.state == CampaignState.active.value:
                self._publish(record, recorded)
            report.published_again = self._publish_unpublished(record)
        except PublishError as exc:
            report.broker_error = str(exc.__cause__ or exc).splitlines()[0][:200]
            log.warning("%s; the reconciler publishes them when the broker answers", exc)
        return report

    def _chunks(self, intake, source, combos, cap: int, size: int) -> Iterator[list[tuple[str, ImageSpec]]]:
        """``(item_key, spec)`` lists of up to ``size`` images: every row checked and expanded, its
        id unique in the input, the total under ``cap``."""
        combo_keys = [json.dumps(combo, sort_keys=True) for combo in combos]
        base_dir = Path(source).resolve().parent if isinstance(source, (str, Path)) else None
        seen: dict[Any, int] = {}  # row id (or its digest) → the line that first had it
        chunk: list[tuple[str, ImageSpec]] = []
        total = 0
        prepare = intake.prepare
        sha256 = hashlib.sha256
        for number, explicit, fields in self._rows(source):
            try:
                rid = row_id(explicit, fields)
            except (RecursionError, ValueError) as exc:  # nested past the stack, holding itself, a 5,000-digit int
                reason = "nests too deep" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
                raise ValidationError(
                    "row", shown(fields.get("prompt")), f"cannot be read as request fields ({reason})",
                    where=self._where(source, number),
                ) from None
            seen_key = rid if len(rid) <= 40 else sha256(rid.encode()).digest()
            first = seen.setdefault(seen_key, number)
            if first != number:
                raise self._repeated(source, number, first, explicit, fields)
            for combo, combo_key in zip(combos, combo_keys):
                try:
                    specs = prepare({**fields, **combo} if combo else fields, base_dir=base_dir)
                except ValidationError as exc:
                    raise exc.at(self._where(source, number)) from None
                total += len(specs)
                if total > cap:
                    raise ValidationError(
                        "images", f"more than {cap}", f"the input × sweeps expands past the cap of {cap} images "
                        "(FARM_LIMITS__MAX_CAMPAIGN_IMAGES)", where=self._where(source, number),
                    )
                prefix = f"{rid}\x1f{combo_key}\x1f"
                for index, spec in enumerate(specs):
                    chunk.append((sha256(f"{prefix}{index}".encode()).hexdigest()[:40], spec))
                if len(chunk) >= size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    def _repeated(self, source, number: int, first: int, explicit: str | None, fields: dict) -> ValidationError:
        where, earlier = self._where(source, number), f"{self._unit(source)} {first}"
        if explicit is not None:
            return ValidationError(
                "id", shown(explicit), f"repeats {earlier}: each row's id must be unique in the input", where=where
            )
        return ValidationError(
            "row", shown(fields.get("prompt")), f"is the same row as {earlier} (a row without an id is known by its "
            "content, so both would be the same images): remove one, give each an id, or use num_images",
            where=where,
        )

    @staticmethod
    def _count(report: SubmitReport, chunk: list[tuple[str, ImageSpec]], per_step: float) -> None:
        report.total += len(chunk)
        report.estimated_gpu_seconds += per_step * sum(spec.steps * spec.width * spec.height for _, spec in chunk) / (512 * 512)

    @staticmethod
    def _rows(source) -> Iterator[Row]:
        if isinstance(source, (str, Path)):
            yield from read_rows(Path(source))
            return
        if isinstance(source, (bytes, dict)) or not isinstance(source, Iterable):
            raise ValidationError("source", shown(source), "must be a .jsonl/.csv/.parquet path or an iterable of dicts")
        for number, raw in enumerate(source, start=1):
            if not isinstance(raw, dict):
                raise ValidationError("row", shown(raw), "must be a dict of request fields", where=f"row {number}")
            yield finish_row(number, raw, f"row {number}")

    @staticmethod
    def _unit(source) -> str:
        """How the input counts its rows: a text file by line, Parquet and iterables by row."""
        return "line" if isinstance(source, (str, Path)) and Path(source).suffix.lower() != ".parquet" else "row"

    @classmethod
    def _where(cls, source, number: int) -> str:
        unit = f"{cls._unit(source)} {number}"
        return f"{Path(source).name} {unit}" if isinstance(source, (str, Path)) else unit

    def _ensure(self, session, priority: int | None) -> CampaignRecord:
        record = session.scalar(select(CampaignRecord).where(CampaignRecord.name == self.name))
        if record is None:
            record = CampaignRecord(
                id=str(uuid.uuid4()), name=self.name, state=CampaignState.active.value,
                priority=self._services.settings.campaign_priority if priority is None else priority,
            )
            session.add(record)
        elif priority is not None:
            record.priority = priority
        if record.state == CampaignState.canceled.value:
            raise ValidationError("campaign", self.name, "was canceled; submit under a new name")
        session.flush()
        return record

    def _write_chunk(self, session, record: CampaignRecord, chunk, report: SubmitReport, *, fresh: bool):
        """Record the chunk's new images in the open transaction; ``(submission id, batches, count)`` or None."""
        existing: set[str] = set()
        if not fresh:
            existing = set(
                session.scalars(
                    select(ImageRecord.item_key).where(
                        ImageRecord.campaign_id == record.id, ImageRecord.item_key.in_([key for key, _ in chunk])
                    )
                )
            )
        new = [item for item in chunk if item[0] not in existing] if existing else chunk
        report.existing += len(chunk) - len(new)
        if not new:
            return None
        paused = record.state == CampaignState.paused.value
        submission_id, batches = lifecycle.record(
            _InTransaction(session),
            [spec for _, spec in new],
            num_requests=len(new),
            settings=self._services.settings,
            label=f"campaign:{self.name}",
            campaign_id=record.id,
            item_keys=[key for key, _ in new],
            status=Status.paused if paused else Status.queued,
        )
        report.new += len(new)
        return submission_id, batches, len(new)

    def _publish(self, record: CampaignRecord, recorded: list[_Chunk]) -> None:
        """Queue what this submit recorded (committed), each chunk then marked published."""
        services = self._services
        origin = f"campaign:{self.name}"
        for chunk in recorded:
            if chunk.batches is not None:
                publish(services.celery, chunk.batches, services.settings, origin=origin, priority=record.priority)
            else:
                publish_queued(
                    services.sessions, services.celery, services.settings,
                    ImageRecord.submission_id == chunk.submission_id, origin=origin,
                )
            mark_published(services.sessions, SubmissionRecord.id == chunk.submission_id)

    @staticmethod
    def _has_images(session, record: CampaignRecord) -> bool:
        return session.scalar(select(ImageRecord.id).where(ImageRecord.campaign_id == record.id).limit(1)) is not None

    def _publish_unpublished(self, record: CampaignRecord) -> int:
        """Queue the images an earlier, interrupted submit recorded but never published."""
        if record.state != CampaignState.active.value:
            return 0
        unpublished = select(SubmissionRecord.id).where(
            SubmissionRecord.campaign_id == record.id, SubmissionRecord.published_at.is_(None)
        )
        services = self._services
        count = publish_queued(
            services.sessions, services.celery, services.settings,
            ImageRecord.campaign_id == record.id, ImageRecord.submission_id.in_(unpublished),
            origin=f"campaign:{self.name}",
        )
        mark_published(services.sessions, SubmissionRecord.campaign_id == record.id)
        return count

    def _seconds_per_step(self) -> float:
        """Recorded GPU seconds per step of a 512² image on this farm, or the default guess."""
        with self._services.sessions() as session:
            row = session.execute(
                select(
                    func.sum(ImageRecord.gpu_seconds),
                    func.sum(ImageRecord.steps * ImageRecord.width * ImageRecord.height),
                ).where(ImageRecord.status == Status.succeeded.value, ImageRecord.gpu_seconds.is_not(None))
            ).one()
        seconds, work = row
        if seconds and work:
            return float(seconds) / (float(work) / (512 * 512))
        return DEFAULT_SECONDS_PER_STEP_512

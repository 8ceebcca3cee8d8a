"""Campaigns: many images from a prompt file × sweeps, resumable, idempotent, controllable.

Submitting reads the input twice, streaming: a first pass validates every row and counts the images
(so a bad line or a sweep past the cap stops everything before anything is written), a second pass
writes and publishes in chunks. Each image has a stable ``item_key`` (row id × sweep values × index),
so submitting the same file again, or after the submitter was killed half way, adds only what is
missing, and publishes what was recorded but never reached the broker.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from sqlalchemy import func, select, update

from farm import submissions
from farm.errors import NotFound, ValidationError
from farm.progress import wait_until
from farm.inputs import Row, combinations, parse_sweeps, read_rows, row_id
from farm.records import CampaignRecord, CampaignState, ImageRecord, Status, SubmissionRecord, utcnow
from farm.spec import ImageSpec, check_request

if TYPE_CHECKING:
    from farm.client import Farm

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

    def __str__(self) -> str:
        if self.dry_run:
            return (
                f"{self.campaign}: {self.total} image(s); estimated GPU time "
                f"{timedelta(seconds=round(self.estimated_gpu_seconds))} (dry run: nothing submitted)"
            )
        return (
            f"{self.campaign}: {self.total} image(s): {self.new} new, {self.existing} already there"
            + (f", {self.published_again} queued again" if self.published_again else "")
        )


@dataclass
class CampaignStatus:
    name: str
    state: str
    counts: dict[str, int]
    images_per_s: float | None
    eta_seconds: float | None
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts[s] for s in ("succeeded", "failed", "canceled"))

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {s}" for s, n in self.counts.items() if n)
        rate = f", {self.images_per_s:.2f} images/s" if self.images_per_s else ""
        eta = f", ETA {timedelta(seconds=round(self.eta_seconds))}" if self.eta_seconds else ""
        lines = [f"{self.name} [{self.state}]: {self.finished}/{self.total} finished ({parts}){rate}{eta}"]
        lines += [f"  failed ×{n}: {reason}" for reason, n in self.failures.items()]
        return "\n".join(lines)


@dataclass
class _Item:
    key: str
    spec: ImageSpec


class Campaign:
    """A handle on a named campaign (created by its first ``submit``)."""

    def __init__(self, farm: "Farm", name: str):
        if not name or len(name) > 255:
            raise ValidationError("name", name, "must be 1 to 255 characters")
        self._farm = farm
        self.name = name
        self._fresh = False

    # -- submit -------------------------------------------------------------------------------
    def submit(
        self,
        source: str | Path | Iterable[dict[str, Any]],
        *,
        sweeps: list[str] | dict[str, list[Any]] | None = None,
        dry_run: bool = False,
        priority: int | None = None,
        on_total: Callable[[SubmitReport], None] | None = None,
    ) -> SubmitReport:
        """Expand ``source`` (a .jsonl/.csv/.parquet path, or dicts) × ``sweeps`` and queue what is new."""
        settings = self._farm.settings
        sweep_values = parse_sweeps(sweeps or [])
        combos = combinations(sweep_values)
        if priority is not None and not 0 <= priority <= 9:
            raise ValidationError("priority", priority, "must be between 0 (first) and 9 (last)")

        # pass 1: validate everything and count, before anything is written
        total, estimate = 0, 0.0
        per_step = self._seconds_per_step()
        cap = settings.limits.max_campaign_images
        for item in self._items(source, combos, keys=False):
            total += 1
            if total > cap:
                raise ValidationError(
                    "images", f"more than {cap}", f"the input × sweeps expands past the cap of {cap} images "
                    "(FARM_LIMITS__MAX_CAMPAIGN_IMAGES)",
                )
            estimate += item.spec.steps * per_step * (item.spec.width * item.spec.height) / (512 * 512)
        report = SubmitReport(campaign=self.name, total=total, estimated_gpu_seconds=estimate, dry_run=dry_run)
        if on_total is not None:  # the count and estimate, shown before anything is submitted
            on_total(report)
        if dry_run:
            return report

        # pass 2: write new images and publish them, chunk by chunk
        record = self._ensure(priority)
        self._fresh = not self._has_images(record)  # a new campaign: no key can exist yet
        chunk: list[_Item] = []
        for item in self._items(source, combos):
            chunk.append(item)
            if len(chunk) >= settings.campaign_chunk_size:
                self._write_chunk(record, chunk, report)
                chunk = []
        if chunk:
            self._write_chunk(record, chunk, report)
        report.published_again = self._publish_unpublished(record)
        return report

    def _items(self, source, combos: list[dict[str, Any]], *, keys: bool = True) -> Iterator[_Item]:
        settings = self._farm.settings
        combo_keys = [json.dumps(combo, sort_keys=True) for combo in combos]
        for number, explicit, fields in self._rows(source):
            rid = row_id(explicit, fields) if keys else ""
            for combo, combo_key in zip(combos, combo_keys):
                try:
                    checked = check_request({**fields, **combo}, settings)
                except ValidationError as exc:
                    raise exc.at(self._where(source, number)) from None
                for index, spec in enumerate(checked.images):
                    key = hashlib.sha256(f"{rid}\x1f{combo_key}\x1f{index}".encode()).hexdigest()[:40] if keys else ""
                    yield _Item(key=key, spec=spec)

    @staticmethod
    def _rows(source) -> Iterator[Row]:
        if isinstance(source, (str, Path)):
            yield from read_rows(Path(source))
            return
        from farm.inputs import _finish

        for number, raw in enumerate(source, start=1):
            if not isinstance(raw, dict):
                raise ValidationError("row", raw, "must be a dict of request fields", where=f"row {number}")
            yield _finish(number, raw, f"row {number}")

    @staticmethod
    def _where(source, number: int) -> str:
        return f"{Path(source).name} line {number}" if isinstance(source, (str, Path)) else f"row {number}"

    def _ensure(self, priority: int | None) -> CampaignRecord:
        with self._farm.sessions.begin() as session:
            record = session.scalar(select(CampaignRecord).where(CampaignRecord.name == self.name))
            if record is None:
                record = CampaignRecord(
                    id=str(uuid.uuid4()), name=self.name, state=CampaignState.active.value,
                    priority=self._farm.settings.campaign_priority if priority is None else priority,
                )
                session.add(record)
            elif priority is not None:
                record.priority = priority
            if record.state == CampaignState.canceled.value:
                raise ValidationError("campaign", self.name, "was canceled; submit under a new name")
            session.flush()
            session.expunge(record)
        return record

    def _write_chunk(self, record: CampaignRecord, chunk: list[_Item], report: SubmitReport) -> None:
        farm = self._farm
        keys = [item.key for item in chunk]
        existing: set[str] = set()
        if not self._fresh:
            with farm.sessions() as session:
                existing = set(
                    session.scalars(
                        select(ImageRecord.item_key).where(
                            ImageRecord.campaign_id == record.id, ImageRecord.item_key.in_(keys)
                        )
                    )
                )
        fresh = [item for item in chunk if item.key not in existing]
        report.existing += len(chunk) - len(fresh)
        if not fresh:
            return
        submission_id, batches = submissions.record_submission(
            farm.sessions,
            [item.spec for item in fresh],
            num_requests=len(fresh),
            settings=farm.settings,
            label=f"campaign:{self.name}",
            campaign_id=record.id,
            item_keys=[item.key for item in fresh],
        )
        if record.state == CampaignState.paused.value:
            self._set_status(record.id, Status.queued, Status.paused, submission_id=submission_id)
        else:
            submissions.publish(
                farm.celery, batches, farm.settings, submission_id=submission_id, sessions=farm.sessions,
                priority=record.priority, whole_submission=submission_id,
            )
        report.new += len(fresh)

    def _has_images(self, record: CampaignRecord) -> bool:
        with self._farm.sessions() as session:
            return session.scalar(select(ImageRecord.id).where(ImageRecord.campaign_id == record.id).limit(1)) is not None

    def _publish_unpublished(self, record: CampaignRecord) -> int:
        """Queue the images an earlier, interrupted submit recorded but never published."""
        if record.state != CampaignState.active.value:
            return 0
        unpublished = select(SubmissionRecord.id).where(
            SubmissionRecord.campaign_id == record.id, SubmissionRecord.published_at.is_(None)
        )
        count = self._republish(record, ImageRecord.submission_id.in_(unpublished))
        with self._farm.sessions.begin() as session:
            session.execute(
                update(SubmissionRecord)
                .where(SubmissionRecord.campaign_id == record.id, SubmissionRecord.published_at.is_(None))
                .values(published_at=utcnow())
            )
        return count

    def _republish(self, record: CampaignRecord, condition) -> int:
        farm = self._farm
        with farm.sessions() as session:
            rows = session.execute(
                select(ImageRecord.task_id, ImageRecord.model, ImageRecord.id).where(
                    ImageRecord.campaign_id == record.id, ImageRecord.status == Status.queued.value, condition
                )
            ).all()
        grouped: dict[tuple[str, str], list[str]] = {}
        for task_id, model, image_id in rows:
            grouped.setdefault((task_id, model), []).append(image_id)
        if grouped:
            submissions.publish(
                farm.celery, submissions.regrouped(grouped), farm.settings, submission_id=f"campaign:{self.name}",
                sessions=farm.sessions, priority=record.priority,
            )
        return len(rows)

    def _seconds_per_step(self) -> float:
        """Recorded GPU seconds per step of a 512² image on this farm, or the default guess."""
        with self._farm.sessions() as session:
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

    # -- control ------------------------------------------------------------------------------
    def _record(self) -> CampaignRecord:
        with self._farm.sessions() as session:
            record = session.scalar(select(CampaignRecord).where(CampaignRecord.name == self.name))
            if record is None:
                raise NotFound(f"no campaign {self.name!r}: `farm campaign submit FILE --name {self.name}` creates it")
            session.expunge(record)
            return record

    def _set_state(self, record: CampaignRecord, state: CampaignState) -> None:
        with self._farm.sessions.begin() as session:
            session.execute(update(CampaignRecord).where(CampaignRecord.id == record.id).values(state=state.value))

    def _set_status(self, campaign_id: str, new: Status, *old: Status, submission_id: str | None = None, **values) -> int:
        with self._farm.sessions.begin() as session:
            query = update(ImageRecord).where(
                ImageRecord.campaign_id == campaign_id, ImageRecord.status.in_([s.value for s in old])
            )
            if submission_id is not None:
                query = query.where(ImageRecord.submission_id == submission_id)
            return session.execute(query.values(status=new.value, **values)).rowcount

    def pause(self) -> int:
        """Hold back every queued image (running batches finish); returns how many were held."""
        record = self._record()
        self._set_state(record, CampaignState.paused)
        return self._set_status(record.id, Status.paused, Status.queued)

    def resume(self) -> int:
        """Queue the held images again; returns how many."""
        record = self._record()
        if record.state == CampaignState.canceled.value:
            raise ValidationError("campaign", self.name, "was canceled and cannot be resumed")
        self._set_state(record, CampaignState.active)
        self._set_status(record.id, Status.queued, Status.paused)
        record.state = CampaignState.active.value
        return self._republish(record, ImageRecord.id.is_not(None))

    def cancel(self) -> int:
        """Drop queued and held images; running batches stop at their next step. Returns the count."""
        record = self._record()
        self._set_state(record, CampaignState.canceled)
        return self._set_status(
            record.id, Status.canceled, Status.queued, Status.paused, Status.running,
            finished_at=utcnow(), error="canceled with its campaign",
        )

    def retry_failed(self) -> int:
        """Queue the failed images again (fresh attempts); returns how many."""
        record = self._record()
        count = self._set_status(record.id, Status.queued, Status.failed, attempts=0, error=None, finished_at=None)
        if record.state == CampaignState.active.value:
            self._republish(record, ImageRecord.attempts == 0)
        return count

    def status(self) -> CampaignStatus:
        record = self._record()
        with self._farm.sessions() as session:
            found = dict(
                session.execute(
                    select(ImageRecord.status, func.count())
                    .where(ImageRecord.campaign_id == record.id)
                    .group_by(ImageRecord.status)
                ).all()
            )
            failures = dict(
                session.execute(
                    select(ImageRecord.error, func.count())
                    .where(ImageRecord.campaign_id == record.id, ImageRecord.status == Status.failed.value)
                    .group_by(ImageRecord.error)
                    .order_by(func.count().desc())
                    .limit(10)
                ).all()
            )
            first, last, done = session.execute(
                select(func.min(ImageRecord.started_at), func.max(ImageRecord.finished_at), func.count()).where(
                    ImageRecord.campaign_id == record.id, ImageRecord.status == Status.succeeded.value
                )
            ).one()
        counts = {s.value: int(found.get(s.value, 0)) for s in Status}
        rate = eta = None
        if done and first and last and last > first:
            rate = done / (last - first).total_seconds()
            remaining = counts["queued"] + counts["running"] + counts["paused"]
            eta = remaining / rate if remaining else None
        return CampaignStatus(self.name, record.state, counts, rate, eta, {str(k): v for k, v in failures.items()})

    def wait(self, timeout: float | None = None, *, progress: bool = False, poll_interval: float = 1.0) -> CampaignStatus:
        """Block until nothing is queued or running (held images do not count)."""
        return wait_until(
            self.status,
            lambda status: status.counts["queued"] + status.counts["running"] == 0,
            timeout=timeout,
            poll_interval=poll_interval,
            progress=progress,
            desc=self.name,
            timed_out=lambda status: f"campaign {self.name}: {status.finished}/{status.total} after {timeout} s",
        )

    def export(self, dest: str, *, fmt: str = "imagefolder", shard_size: int = 1000):
        """Write the finished images to ``dest`` (folder or s3:// prefix) as a dataset; see ``farm.export``."""
        from farm.export import export

        return export(self, dest, fmt=fmt, shard_size=shard_size)

    def contact_sheet(self, out: str | Path, *, sample: int = 16, columns: int = 4) -> Path:
        """A grid PNG of up to ``sample`` finished images with their prompts as captions."""
        import tempfile

        from farm.contact_sheet import contact_sheet

        storage = self._farm.storage
        with tempfile.TemporaryDirectory() as tmp:
            items = []
            for n, image in enumerate(self.images()):
                if n >= sample:
                    break
                path = Path(tmp) / f"{n}.png"
                path.write_bytes(storage.get(image.storage_key))
                items.append((path, f"{image.prompt} (seed {image.seed})"))
            if not items:
                raise NotFound(f"campaign {self.name!r} has no finished image yet")
            return contact_sheet(items, Path(out), columns=columns)

    def images(self, *, status: Status | None = Status.succeeded, batch: int = 1000) -> Iterator[ImageRecord]:
        """Stream the campaign's image records in a stable order (for export), ``batch`` at a time."""
        record = self._record()
        last = ""
        while True:
            with self._farm.sessions() as session:
                query = select(ImageRecord).where(ImageRecord.campaign_id == record.id, ImageRecord.id > last)
                if status is not None:
                    query = query.where(ImageRecord.status == status.value)
                rows = list(session.scalars(query.order_by(ImageRecord.id).limit(batch)))
                session.expunge_all()
            if not rows:
                return
            yield from rows
            last = rows[-1].id

"""Campaign control and status: what you do with a campaign once it is submitted.

:class:`CampaignControl` is the part of a :class:`farm.campaigns.submit.Campaign` handle that pauses
(holds queued images back), resumes, cancels and retries failed images, reports progress
(:class:`CampaignStatus`: counts by status, rate, ETA, the commonest failures), waits, and reads the
finished images back (``images``, ``export``, ``contact_sheet``). Submitting (expanding an input ×
sweeps, recording and publishing) lives in :mod:`farm.campaigns.submit`, whose ``Campaign`` adds ``submit``
to this class; ``farm.campaigns.submit`` re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sqlalchemy import func, select, update

from farm.dispatch import submissions
from farm.errors import NotFound, ValidationError
from farm.progress import wait_until
from farm.db.tables import CampaignRecord, CampaignState, ImageRecord, Status, utcnow

if TYPE_CHECKING:
    from farm.client import Farm


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


class CampaignControl:
    """A handle on a named campaign: control, status and its finished images (see the module docstring).

    :class:`farm.campaigns.submit.Campaign` is the full handle (this plus ``submit``); ``farm.campaign(name)``
    returns one.
    """

    def __init__(self, farm: "Farm", name: str):
        if not name or len(name) > 255:
            raise ValidationError("name", name, "must be 1 to 255 characters")
        self._farm = farm
        self.name = name

    # -- helpers (submit uses _set_status and _republish too) --------------------------------------
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

    def _republish(self, record: CampaignRecord, condition) -> int:
        """Publish the campaign's queued images that match ``condition`` again; returns how many."""
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

    # -- control and status ---------------------------------------------------------------------
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
        """Write the finished images to ``dest`` (folder or s3:// prefix) as a dataset; see ``farm.campaigns.export``."""
        from farm.campaigns.export import export

        return export(self, dest, fmt=fmt, shard_size=shard_size)

    def contact_sheet(self, out: str | Path, *, sample: int = 16, columns: int = 4) -> Path:
        """A grid PNG of up to ``sample`` finished images with their prompts as captions."""
        import tempfile

        from farm.imaging.contact_sheet import contact_sheet

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

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

from farm import lifecycle
from farm.dispatch.publish import publish_queued
from farm.errors import NotFound, ValidationError
from farm.failures import summarize
from farm.progress import Tally, wait_until
from farm.results import ImageResult, image_result
from farm.db.tables import CampaignRecord, CampaignState, ImageRecord, Status, utcnow

if TYPE_CHECKING:
    from farm.services import Services


@dataclass
class CampaignStatus(Tally):
    name: str
    state: str
    counts: dict[str, int]
    images_per_s: float | None
    eta_seconds: float | None
    #: failed images by reason class: ``{class: (count, an example error)}`` (``farm.failures``)
    failures: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: images × steps: finished images count whole, running ones as far as their worker got
    steps_done: int = 0
    steps_total: int = 0

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {s}" for s, n in self.counts.items() if n)
        rate = f", {self.images_per_s:.2f} images/s" if self.images_per_s else ""
        eta = f", ETA {timedelta(seconds=round(self.eta_seconds))}" if self.eta_seconds else ""
        from farm.failures import lines

        head = f"{self.name} [{self.state}]: {self.finished}/{self.total} finished ({parts}){rate}{eta}"
        return "\n".join([head, *lines(self.failures)])


#: Seconds of finished images a campaign's rate and ETA are measured over.
RATE_WINDOW_SECONDS = 600


class CampaignControl:
    """A handle on a named campaign: control, status and its finished images (see the module docstring).

    :class:`farm.campaigns.submit.Campaign` is the full handle (this plus ``submit``); ``farm.campaign(name)``
    returns one.
    """

    def __init__(self, services: "Services", name: str):
        if not name or len(name) > 255:
            raise ValidationError("name", name, "must be 1 to 255 characters")
        self._services = services
        self.name = name

    # -- helpers --------------------------------------
    def _record(self) -> CampaignRecord:
        with self._services.sessions() as session:
            record = session.scalar(select(CampaignRecord).where(CampaignRecord.name == self.name))
            if record is None:
                raise NotFound(f"no campaign {self.name!r}: `farm campaign submit FILE --name {self.name}` creates it")
            session.expunge(record)
            return record

    def _set_state(self, record: CampaignRecord, state: CampaignState) -> None:
        with self._services.sessions.begin() as session:
            session.execute(update(CampaignRecord).where(CampaignRecord.id == record.id).values(state=state.value))

    def _publish_queued(self, record: CampaignRecord, *conditions) -> int:
        """Publish the campaign's queued images (matching ``conditions``) again, at its priority."""
        services = self._services
        return publish_queued(
            services.sessions, services.celery, services.settings, ImageRecord.campaign_id == record.id, *conditions,
            origin=f"campaign:{self.name}",
        )

    # -- control and status ---------------------------------------------------------------------
    def pause(self) -> int:
        """Hold back every queued image (running batches finish); returns how many were held."""
        record = self._record()
        self._set_state(record, CampaignState.paused)
        return lifecycle.pause(self._services.sessions, ImageRecord.campaign_id == record.id)

    def resume(self) -> int:
        """Queue the held images again; returns how many."""
        record = self._record()
        if record.state == CampaignState.canceled.value:
            raise ValidationError("campaign", self.name, "was canceled and cannot be resumed")
        self._set_state(record, CampaignState.active)
        lifecycle.resume(self._services.sessions, ImageRecord.campaign_id == record.id)
        return self._publish_queued(record)

    def cancel(self) -> int:
        """Drop queued and held images; running batches stop at their next step. Returns the count."""
        record = self._record()
        self._set_state(record, CampaignState.canceled)
        return lifecycle.cancel(self._services.sessions, ImageRecord.campaign_id == record.id, reason="canceled with its campaign")

    def retry_failed(self) -> int:
        """Queue the failed images again (fresh attempts); returns how many."""
        record = self._record()
        count = lifecycle.retry_failed(self._services.sessions, ImageRecord.campaign_id == record.id)
        if record.state == CampaignState.active.value:
            self._publish_queued(record, ImageRecord.attempts == 0)
        return count

    def status(self) -> CampaignStatus:
        record = self._record()
        with self._services.sessions() as session:
            found = dict(
                session.execute(
                    select(ImageRecord.status, func.count())
                    .where(ImageRecord.campaign_id == record.id)
                    .group_by(ImageRecord.status)
                ).all()
            )
            failures = summarize(session, ImageRecord.campaign_id == record.id)
            # the rate over the last RATE_WINDOW_SECONDS (or since the first image started, if later)
            now = utcnow()
            window_start = now - timedelta(seconds=RATE_WINDOW_SECONDS)
            first = session.scalar(select(func.min(ImageRecord.started_at)).where(ImageRecord.campaign_id == record.id))
            recent = session.scalar(
                select(func.count()).where(
                    ImageRecord.campaign_id == record.id,
                    ImageRecord.status == Status.succeeded.value,
                    ImageRecord.finished_at >= window_start,
                )
            )
            steps_done, steps_total = lifecycle.steps(session, ImageRecord.campaign_id == record.id)
        counts = {s.value: int(found.get(s.value, 0)) for s in Status}
        remaining = counts["queued"] + counts["running"] + counts["paused"]
        rate = eta = None
        if recent and first:
            span = (now - max(first, window_start)).total_seconds()
            rate = recent / span if span > 0 else None
            eta = remaining / rate if remaining and rate else None
        state = record.state
        if state == CampaignState.active.value and counts and not remaining and sum(counts.values()):
            state = "finished"  # nothing left to render (failed images can still be retried)
        return CampaignStatus(
            self.name, state, counts, rate if remaining else None, eta, failures,
            steps_done=steps_done, steps_total=steps_total,
        )

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

        storage = self._services.storage
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

    def images(self, *, status: Status | None = Status.succeeded, batch: int = 1000) -> Iterator[ImageResult]:
        """Stream the campaign's images (:class:`~farm.results.ImageResult`, every parameter) in a
        stable order (for export), ``batch`` at a time."""
        record = self._record()
        storage = self._services.storage
        last = ""
        while True:
            with self._services.sessions() as session:
                query = select(ImageRecord).where(ImageRecord.campaign_id == record.id, ImageRecord.id > last)
                if status is not None:
                    query = query.where(ImageRecord.status == status.value)
                rows = list(session.scalars(query.order_by(ImageRecord.id).limit(batch)))
                session.expunge_all()
            if not rows:
                return
            for row in rows:
                yield image_result(row, storage)
            last = rows[-1].id

"""Campaigns: many images from a prompt file × sweeps, resumable, idempotent, controllable.

Submitting reads the input twice, streaming: a first pass validates every row and counts the images
(so a bad line or a sweep past the cap stops everything before anything is written), a second pass
writes and publishes in chunks. Each image has a stable ``item_key`` (row id × sweep values × index),
so submitting the same file again, or after the submitter was killed half way, adds only what is
missing, and publishes what was recorded but never reached the broker.

This module holds submitting: :class:`Campaign` (the handle ``farm.campaign(name)`` returns) and
:class:`SubmitReport`. Control and status (pause, resume, cancel, retry failed, status, wait, and
reading the finished images back) live in :mod:`farm.campaigns.control`: ``Campaign`` inherits them
from :class:`~farm.campaigns.control.CampaignControl`, and :class:`CampaignStatus` is re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from sqlalchemy import func, select, update

from farm import lifecycle
from farm.campaigns.control import CampaignControl, CampaignStatus
from farm.campaigns.prompt_files import Row, combinations, finish_row, parse_sweeps, read_rows, row_id
from farm.db.tables import CampaignRecord, CampaignState, ImageRecord, Status, SubmissionRecord
from farm.dispatch.publish import mark_published, publish, publish_queued
from farm.errors import ValidationError
from farm.request.spec import ImageSpec

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
class _Item:
    key: str
    spec: ImageSpec


class Campaign(CampaignControl):
    """A handle on a named campaign (created by its first ``submit``).

    ``submit`` is here; control, status and the finished images come from
    :class:`~farm.campaigns.control.CampaignControl`.
    """

    #: Set by ``submit``: the campaign had no image yet, so no item key can exist (skips the lookups).
    _fresh = False

    def __init__(self, services: "Services", name: str, *, intake: Callable[[], "Intake"]):
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
    ) -> SubmitReport:
        """Expand ``source`` (a .jsonl/.csv/.parquet path, or dicts) × ``sweeps`` and queue what is new.

        Each row is a request like any other (``farm.request.intake``): the model's defaults, LoRAs
        (``loras``: names with weights), init images and masks (paths relative to the prompt file,
        or URIs of the farm's storage), strength, clip skip… A row and the same plain request give
        identical parameters.
        """
        settings = self._services.settings
        intake = self._intake()
        sweep_values = parse_sweeps(sweeps or [])
        combos = combinations(sweep_values)
        if priority is not None and not 0 <= priority <= 9:
            raise ValidationError("priority", priority, "must be between 0 (first) and 9 (last)")

        # pass 1: validate everything and count, before anything is written
        total, estimate = 0, 0.0
        per_step = self._seconds_per_step()
        cap = settings.limits.max_campaign_images
        for item in self._items(intake, source, combos, keys=False):
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

        # pass 2: store the input images (once each), write new images and publish them, chunk by chunk
        intake.upload_inputs()
        record = self._ensure(priority)
        self._fresh = not self._has_images(record)  # a new campaign: no key can exist yet
        chunk: list[_Item] = []
        for item in self._items(intake, source, combos):
            chunk.append(item)
            if len(chunk) >= settings.campaign_chunk_size:
                self._write_chunk(record, chunk, report)
                chunk = []
        if chunk:
            self._write_chunk(record, chunk, report)
        report.published_again = self._publish_unpublished(record)
        return report

    def _items(self, intake, source, combos: list[dict[str, Any]], *, keys: bool = True) -> Iterator[_Item]:
        combo_keys = [json.dumps(combo, sort_keys=True) for combo in combos]
        base_dir = Path(source).resolve().parent if isinstance(source, (str, Path)) else None
        for number, explicit, fields in self._rows(source):
            rid = row_id(explicit, fields) if keys else ""
            for combo, combo_key in zip(combos, combo_keys):
                try:
                    specs = intake.prepare({**fields, **combo}, base_dir=base_dir)
                except ValidationError as exc:
                    raise exc.at(self._where(source, number)) from None
                for index, spec in enumerate(specs):
                    key = hashlib.sha256(f"{rid}\x1f{combo_key}\x1f{index}".encode()).hexdigest()[:40] if keys else ""
                    yield _Item(key=key, spec=spec)

    @staticmethod
    def _rows(source) -> Iterator[Row]:
        if isinstance(source, (str, Path)):
            yield from read_rows(Path(source))
            return
        for number, raw in enumerate(source, start=1):
            if not isinstance(raw, dict):
                raise ValidationError("row", raw, "must be a dict of request fields", where=f"row {number}")
            yield finish_row(number, raw, f"row {number}")

    @staticmethod
    def _where(source, number: int) -> str:
        return f"{Path(source).name} line {number}" if isinstance(source, (str, Path)) else f"row {number}"

    def _ensure(self, priority: int | None) -> CampaignRecord:
        with self._services.sessions.begin() as session:
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
            session.expunge(record)
        return record

    def _write_chunk(self, record: CampaignRecord, chunk: list[_Item], report: SubmitReport) -> None:
        services = self._services
        keys = [item.key for item in chunk]
        existing: set[str] = set()
        if not self._fresh:
            with services.sessions() as session:
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
        paused = record.state == CampaignState.paused.value
        submission_id, batches = lifecycle.record(
            services.sessions,
            [item.spec for item in fresh],
            num_requests=len(fresh),
            settings=services.settings,
            label=f"campaign:{self.name}",
            campaign_id=record.id,
            item_keys=[item.key for item in fresh],
            status=Status.paused if paused else Status.queued,
        )
        if not paused:
            publish(services.celery, batches, services.settings, origin=f"campaign:{self.name}", priority=record.priority)
            mark_published(services.sessions, SubmissionRecord.id == submission_id)
        report.new += len(fresh)

    def _has_images(self, record: CampaignRecord) -> bool:
        with self._services.sessions() as session:
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

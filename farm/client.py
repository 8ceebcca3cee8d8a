"""The Python client: ``Farm`` submits work, ``Submission`` follows it.

    from farm import Farm
    farm = Farm.from_env()
    job = farm.submit("a red circle on a blue background", num_images=4, seed=1)
    job.wait(progress=True)
    job.download("out/")

Light by design: no torch, no diffusers (the worker side has them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from sqlalchemy import select

from farm import lifecycle, loras
from farm.db.tables import ImageRecord, Status, SubmissionRecord
from farm.dispatch.publish import mark_published, publish, publish_images, publish_queued
from farm.errors import NotFound, PublishError, ValidationError
from farm.progress import Tally, wait_until
from farm.request.intake import Intake
from farm.request.spec import GenerationRequest, ImageSpec
from farm.results import ImageResult, image_result
from farm.services import Services
from farm.settings import Settings

if TYPE_CHECKING:
    from farm.campaigns import Campaign
    from farm.reconciler import Round
    from farm.storage import Storage

__all__ = ["Farm", "ImageResult", "Submission", "SubmissionStatus"]

log = logging.getLogger("farm")


@dataclass(frozen=True)
class SubmissionStatus(Tally):
    """Counts of a submission's images by status, and its denoising steps done of all."""

    submission_id: str
    counts: dict[str, int]
    #: images × steps: finished images count whole, running ones as far as their worker got
    steps_done: int = 0
    steps_total: int = 0
    label: str | None = None
    campaign: str | None = None
    models: tuple[str, ...] = ()
    #: failed images by reason class: ``{class: (count, an example error)}`` (``farm.failures``)
    failures: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.finished == self.total

    @property
    def succeeded(self) -> bool:
        """True when every image succeeded, or was withheld by the safety policy it asked for
        (``filtered``, policy ``drop``: the work ran as asked)."""
        return self.counts[Status.succeeded.value] + self.counts.get(Status.filtered.value, 0) == self.total

    def __str__(self) -> str:
        from farm.failures import lines

        parts = ", ".join(f"{n} {state}" for state, n in self.counts.items() if n)
        about = [f"{'campaign ' + self.campaign if self.campaign else self.label or ''}".strip(), ", ".join(self.models)]
        about_text = " · ".join(a for a in about if a)
        head = f"{self.submission_id}{' [' + about_text + ']' if about_text else ''}: {self.finished}/{self.total} finished ({parts})"
        return "\n".join([head, *lines(self.failures)])


class Submission:
    """A handle on a submission: status, wait, results, download, cancel."""

    def __init__(self, services: Services, submission_id: str):
        self._services = services
        self.id = submission_id

    def __repr__(self) -> str:
        return f"<Submission {self.id}>"

    def status(self) -> SubmissionStatus:
        """Counts by status, steps done, what it is (label or campaign, models) and its failures
        grouped by reason class."""
        from farm.db.tables import CampaignRecord
        from farm.failures import summarize

        mine = ImageRecord.submission_id == self.id
        with self._services.sessions() as session:
            counts = lifecycle.submission_counts(session, self.id)
            done, total = lifecycle.steps(session, mine)
            label, campaign = session.execute(
                select(SubmissionRecord.label, CampaignRecord.name)
                .outerjoin(CampaignRecord, CampaignRecord.id == SubmissionRecord.campaign_id)
                .where(SubmissionRecord.id == self.id)
            ).one()
            models = tuple(session.scalars(select(ImageRecord.model).where(mine).distinct()))
            failures = summarize(session, mine) if counts[Status.failed.value] else {}
        return SubmissionStatus(
            self.id, counts, steps_done=done, steps_total=total, label=label, campaign=campaign,
            models=models, failures=failures,
        )

    def wait(
        self, timeout: float | None = None, *, progress: bool = False, poll_interval: float = 0.5
    ) -> SubmissionStatus:
        """Block until every image finished (succeeded, failed, canceled or filtered); return the final status.

        With ``progress``, a bar advances by denoising steps (images × steps) as the workers render.
        Raises :class:`~farm.errors.WaitTimeout` when ``timeout`` seconds pass first.
        """
        return wait_until(
            self.status,
            lambda status: status.done,
            timeout=timeout,
            poll_interval=poll_interval,
            progress=progress,
            desc=self.id[:8],
            timed_out=lambda status: f"{status} after {timeout} s; `farm wait {self.id}` goes on waiting",
        )

    def results(self) -> list[ImageResult]:
        """Every image of the submission, in order, with every parameter it was rendered with."""
        storage = self._services.storage
        with self._services.sessions() as session:
            rows = session.scalars(
                select(ImageRecord).where(ImageRecord.submission_id == self.id).order_by(ImageRecord.position)
            ).all()
            if not rows and session.get(SubmissionRecord, self.id) is None:
                raise NotFound(f"no submission {self.id!r}")
        return [image_result(row, storage) for row in rows]

    def download(self, directory: str | Path, *, partial: bool = True) -> list[Path]:
        """Write every succeeded image to ``directory`` with a ``metadata.jsonl``; return the PNG paths.

        ``partial=False`` refuses (:class:`~farm.errors.Incomplete`, nothing written) while any image
        has not succeeded. Images the safety checker withheld (``filtered``) have no PNG: they are
        left out, and do not count as missing.
        """
        results = [r for r in self.results() if r.status != Status.filtered.value]
        missing = [r for r in results if r.status != Status.succeeded.value or not r.storage_key]
        if missing and not partial:
            from farm.errors import Incomplete

            states = ", ".join(sorted({r.status for r in missing}))
            raise Incomplete(
                f"{len(missing)} of {len(results)} image(s) of {self.id} have not succeeded ({states}): "
                f"`farm wait {self.id}` first, or download what is there with --partial"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        storage = self._services.storage
        paths = []
        with open(directory / "metadata.jsonl", "w", encoding="utf-8") as meta:
            for result in results:
                if result in missing:
                    continue
                path = directory / f"{result.position:05d}-{result.seed}.png"
                path.write_bytes(storage.get(result.storage_key))
                paths.append(path)
                meta.write(json.dumps({"file_name": path.name, **result.metadata()}, ensure_ascii=False) + "\n")
        return paths

    def cancel(self) -> int:
        """Cancel what has not finished: queued images are dropped, running batches stop at the next step."""
        self.status()  # NotFound for an unknown id
        return lifecycle.cancel(self._services.sessions, ImageRecord.submission_id == self.id, reason="canceled by the user")

    def retry_failed(self) -> int:
        """Queue this submission's failed images again with fresh attempts; returns how many."""
        self.status()
        services = self._services
        count = lifecycle.retry_failed(services.sessions, ImageRecord.submission_id == self.id)
        if count:
            try:
                publish_queued(
                    services.sessions, services.celery, services.settings,
                    ImageRecord.submission_id == self.id, ImageRecord.publish_after.is_not(None), origin=self.id,
                )
            except PublishError as exc:  # marked in the outbox: the reconciler publishes them
                log.warning("%s; the reconciler publishes them when the broker answers", exc)
        return count

    def requeue(self) -> int:
        """Publish this submission's queued work again; duplicates are harmless. Returns the images."""
        self.status()
        services = self._services
        count = publish_queued(
            services.sessions, services.celery, services.settings, ImageRecord.submission_id == self.id, origin=self.id
        )
        mark_published(services.sessions, SubmissionRecord.id == self.id)
        return count


class Farm:
    """Entry point of the Python client. Build with settings, or from ``FARM_*`` variables.

    Raises :class:`~farm.errors.ConfigError` on bad settings, :class:`~farm.errors.SchemaOutOfDate`
    when a server database needs ``farm db upgrade``.
    """

    def __init__(self, settings: Settings | None = None):
        self.services = Services.open(settings or Settings())

    @classmethod
    def from_env(cls) -> "Farm":
        return cls(Settings())

    def __enter__(self) -> "Farm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.services.close()

    # what the services hold, for callers that need one piece
    @property
    def settings(self) -> Settings:
        return self.services.settings

    @property
    def sessions(self):
        return self.services.sessions

    @property
    def engine(self):
        return self.services.engine

    @property
    def celery(self):
        return self.services.celery

    @property
    def storage(self) -> "Storage":
        return self.services.storage

    # -- submitting -----------------------------------------------------------------------------
    def intake(self) -> Intake:
        """The request path for one submission or campaign (see :mod:`farm.request.intake`)."""
        from farm import embeddings

        services = self.services
        return Intake(
            services.settings,
            resolve_loras=lambda refs, index: loras.resolve(services, refs, index),
            embeddings=lambda: embeddings.matcher(services),
            storage=lambda: services.storage,
        )

    def submit(self, prompt: str | None = None, **fields: Any) -> Submission:
        """Submit one request (``prompt`` plus any field of :class:`~farm.request.spec.GenerationRequest`)."""
        if prompt is not None:
            fields["prompt"] = prompt
        return self.submit_many([fields])

    def submit_many(
        self,
        requests: Iterable[GenerationRequest | Mapping[str, Any]],
        *,
        label: str | None = None,
        base_dir: str | Path | None = None,
        on_recorded: Callable[[Submission], None] | None = None,
        in_transaction: Callable[[Any, str], None] | None = None,
    ) -> Submission:
        """Validate every request, record them all in one transaction, then queue the work.

        Relative image paths start at ``base_dir`` (default: the working directory). Raises
        :class:`~farm.errors.ValidationError` (nothing written, nothing queued) on bad input.
        Once recorded the work is never lost: ``on_recorded`` is called with the submission right
        after the commit, before publishing; if the broker refuses (or this process dies), the
        reconciler every ``farm worker`` runs publishes it (``farm.reconciler``), so a refused publish
        is a logged warning, not an error.

        ``in_transaction(session, submission_id)`` is called inside the transaction that records the
        submission, before its commit: what it writes (``farm api``'s owner row) is committed with
        the submission or not at all, and if it raises nothing is recorded and nothing is queued.
        """
        from farm.request.text import check_label

        settings = self.settings
        label = check_label(label)
        intake = self.intake()
        specs: list[ImageSpec] = []
        count = 0
        for index, request in enumerate(requests):
            if index >= settings.limits.max_requests_per_submission:
                raise ValidationError(
                    "requests", f"more than {index}", f"at most {settings.limits.max_requests_per_submission} per submission"
                )
            specs.extend(intake.prepare(request, index=index, base_dir=Path(base_dir) if base_dir else None))
            count += 1
        if not specs:
            raise ValidationError("requests", [], "at least one request is needed")
        intake.upload_inputs()  # every request is valid: now store the input images, once each
        if in_transaction is None:
            submission_id, batches = lifecycle.record(
                self.sessions, specs, num_requests=count, settings=settings, label=label
            )
        else:
            from farm.campaigns.submit import _InTransaction

            with self.sessions.begin() as session:  # one transaction: the submission and the hook's writes
                submission_id, batches = lifecycle.record(
                    _InTransaction(session), specs, num_requests=count, settings=settings, label=label
                )
                in_transaction(session, submission_id)
                session.flush()  # the hook's rows are checked (keys, constraints) before the commit
        submission = Submission(self.services, submission_id)
        if on_recorded is not None:
            on_recorded(submission)
        try:
            publish(self.celery, batches, settings, origin=submission_id)
        except PublishError as exc:
            log.warning("%s; the reconciler publishes it when the broker answers", exc)
            return submission
        mark_published(self.sessions, SubmissionRecord.id == submission_id)
        return submission

    def campaign(self, name: str) -> "Campaign":
        """A handle on the campaign called ``name`` (its first ``submit`` creates it)."""
        from farm.campaigns import Campaign

        return Campaign(self.services, name, intake=self.intake)

    # -- the LoRA registry ----------------------------------------------------------------------
    def add_lora(self, source: str | Path | bytes, name: str):
        """Register a LoRA (safetensors, diffusers or kohya layout) under ``name``; see ``farm.loras``."""
        return loras.add(self.services, source, name)

    def list_loras(self):
        return loras.listing(self.services)

    def remove_lora(self, name: str) -> None:
        loras.remove(self.services, name)

    def train_lora(self, name: str, data: str | Path, **params: Any):
        """Queue a LoRA training job on the farm's workers; when it succeeds the LoRA is registered as
        ``name``. ``params``: model, rank, steps, lr, batch_size, resolution, text_encoder… (``farm.training.submit``)."""
        from farm import training

        return training.submit(self.services, name=name, data=data, **params)

    # -- following work -------------------------------------------------------------------------
    def submission(self, submission_id: str) -> Submission:
        with self.sessions() as session:
            if session.get(SubmissionRecord, submission_id) is None:
                raise NotFound(f"no submission {submission_id!r}: check the id, or FARM_DATABASE_URL")
        return Submission(self.services, submission_id)

    def latest(self, limit: int = 10) -> list[Submission]:
        with self.sessions() as session:
            ids = session.scalars(
                select(SubmissionRecord.id).order_by(SubmissionRecord.created_at.desc()).limit(limit)
            ).all()
        return [Submission(self.services, submission_id) for submission_id in ids]

    def reconcile(self, *, deep: bool = True) -> "Round":
        """One round of the reconciler (``farm.reconciler``), which every ``farm worker`` runs anyway:
        images of dead workers, work never published, messages the broker lost — queued again."""
        from farm.reconciler import Reconciler

        reconciler = Reconciler(self.services)
        try:
            return reconciler.run_once(deep=deep)
        finally:
            reconciler.step_down()

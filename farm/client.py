"""The Python client: ``Farm`` submits work, ``Submission`` follows it.

    from farm import Farm
    farm = Farm.from_env()
    job = farm.submit("a red circle on a blue background", num_images=4, seed=1)
    job.wait(progress=True)
    job.download("out/")

Light by design: no torch, no diffusers (the worker side has them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from sqlalchemy import select

from farm import db

from farm import lifecycle

from farm.dispatch import submissions
from farm.dispatch.celery_app import make_celery
from farm.errors import NotFound, ValidationError
from farm.progress import wait_until
from farm.db.tables import FINISHED, ImageRecord, Status, SubmissionRecord
from farm.settings import Settings
from farm.imaging.inputs import PreparedImage, prepare_image
from farm.catalogue import recommended
from farm.request.spec import GenerationRequest, ImageSpec, PreparedInputs, check_request
from farm.storage import Storage, open_storage

if TYPE_CHECKING:
    from farm.campaigns.submit import Campaign


@dataclass(frozen=True)
class SubmissionStatus:
    """Counts of a submission's images by status."""

    submission_id: str
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts[s.value] for s in FINISHED)

    @property
    def done(self) -> bool:
        return self.finished == self.total

    @property
    def succeeded(self) -> bool:
        """True when every image succeeded."""
        return self.counts[Status.succeeded.value] == self.total

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {state}" for state, n in self.counts.items() if n)
        return f"{self.submission_id}: {self.finished}/{self.total} finished ({parts})"


@dataclass(frozen=True)
class ImageResult:
    """One image's record, as the user sees it."""

    id: str
    position: int
    status: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    model: str
    model_path: str | None
    storage_key: str | None
    uri: str | None
    error: str | None
    worker: str | None
    attempts: int
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    gpu_seconds: float | None
    prompt_tokens: int | None
    prompt_truncated: bool | None
    #: what the worker recorded: model hash, device, batch size, and each LoRA with how it was
    #: served ("cache": already loaded, "disk": the worker's disk cache, "download": from storage)
    info: dict | None = None
    loras: list | None = None  # [[sha256, weight], …] as requested

    def metadata(self) -> dict[str, Any]:
        """The image's parameters as one JSON-ready dict (the lines of ``metadata.jsonl``)."""
        data = asdict(self)
        for key in ("queued_at", "started_at", "finished_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


class Submission:
    """A handle on a submission: status, wait, results, download, cancel."""

    def __init__(self, farm: "Farm", submission_id: str):
        self._farm = farm
        self.id = submission_id

    def __repr__(self) -> str:
        return f"<Submission {self.id}>"

    def status(self) -> SubmissionStatus:
        with self._farm.sessions() as session:
            return SubmissionStatus(self.id, submissions.counts(session, self.id))

    def wait(
        self, timeout: float | None = None, *, progress: bool = False, poll_interval: float = 0.5
    ) -> SubmissionStatus:
        """Block until every image finished (succeeded, failed or canceled); return the final status.

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
        storage = self._farm.storage
        with self._farm.sessions() as session:
            rows = session.scalars(
                select(ImageRecord).where(ImageRecord.submission_id == self.id).order_by(ImageRecord.position)
            ).all()
            if not rows and session.get(SubmissionRecord, self.id) is None:
                raise NotFound(f"no submission {self.id!r}")
        return [_result(row, storage) for row in rows]

    def download(self, directory: str | Path) -> list[Path]:
        """Write every succeeded image to ``directory`` with a ``metadata.jsonl``; return the PNG paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        storage = self._farm.storage
        paths = []
        with open(directory / "metadata.jsonl", "w", encoding="utf-8") as meta:
            for result in self.results():
                if result.status != Status.succeeded.value or not result.storage_key:
                    continue
                path = directory / f"{result.position:05d}-{result.seed}.png"
                path.write_bytes(storage.get(result.storage_key))
                paths.append(path)
                meta.write(json.dumps({"file_name": path.name, **result.metadata()}, ensure_ascii=False) + "\n")
        return paths

    def cancel(self) -> int:
        """Cancel what has not finished: queued images are dropped, running batches stop at their next step."""
        return submissions.cancel(self._farm.sessions, self.id)

    def requeue(self) -> int:
        """Publish this submission's queued work again (after a broker outage); duplicates are harmless."""
        return submissions.requeue(self._farm.sessions, self._farm.celery, self._farm.settings, self.id)


class Farm:
    """Entry point of the Python client. Build with settings, or from ``FARM_*`` variables."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.engine = db.make_engine(self.settings.database)
        db.ensure_schema(self.engine, auto_upgrade=self.engine.dialect.name == "sqlite")
        self.sessions = db.make_sessionmaker(self.engine)
        self._celery = None
        self._storage: Storage | None = None

    @classmethod
    def from_env(cls) -> "Farm":
        return cls(Settings())

    def __enter__(self) -> "Farm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    @property
    def celery(self):
        if self._celery is None:
            self._celery = make_celery(self.settings)
        return self._celery

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.settings)
        return self._storage

    def submit(self, prompt: str | None = None, **fields: Any) -> Submission:
        """Submit one request (``prompt`` plus any field of :class:`~farm.request.spec.GenerationRequest`)."""
        if prompt is not None:
            fields["prompt"] = prompt
        return self.submit_many([fields])

    def submit_many(
        self, requests: Iterable[GenerationRequest | Mapping[str, Any]], *, label: str | None = None
    ) -> Submission:
        """Validate every request, record them all in one transaction, then queue the work.

        Raises :class:`~farm.errors.ValidationError` (nothing written, nothing queued) on bad input.
        """
        specs: list[ImageSpec] = []
        count = 0
        prepared: dict[Any, PreparedImage] = {}
        for index, request in enumerate(requests):
            if index >= self.settings.limits.max_requests_per_submission:
                raise ValidationError(
                    "requests", f"more than {index}", f"at most {self.settings.limits.max_requests_per_submission} per submission"
                )
            if isinstance(request, GenerationRequest):
                request = request.to_dict()
            request = self._with_model_size(request)
            inputs = self._prepare_inputs(request, index, prepared)
            specs.extend(check_request(request, self.settings, index=index, inputs=inputs).images)
            count += 1
        if not specs:
            raise ValidationError("requests", [], "at least one request is needed")
        # every request is valid: now upload the input images, once each (content-addressed)
        for image in {p.key: p for p in prepared.values()}.values():
            if not self.storage.exists(image.key):
                self.storage.put(image.key, image.data, content_type="image/png")
        submission_id, batches = submissions.record_submission(
            self.sessions, specs, num_requests=count, settings=self.settings, label=label
        )
        submissions.publish(
            self.celery, batches, self.settings, submission_id=submission_id, sessions=self.sessions,
            whole_submission=submission_id,
        )
        return Submission(self, submission_id)

    def campaign(self, name: str) -> "Campaign":
        """A handle on the campaign called ``name`` (its first ``submit`` creates it)."""
        from farm.campaigns.submit import Campaign

        return Campaign(self, name)

    def _with_model_size(self, request: Any) -> Any:
        """A text-to-image request without a size gets its model's recommended one (farm.json), not 512²."""
        if not isinstance(request, Mapping) or request.get("init_image") is not None:
            return request
        if request.get("width") is not None and request.get("height") is not None:
            return request
        model = request.get("model") or self.settings.default_model
        if not isinstance(model, str) or model not in self.settings.models:
            return request  # check_request says what is wrong
        size = {k: v for k, v in recommended(self.settings, model).items() if k in ("width", "height")}
        return {**request, **{k: v for k, v in size.items() if request.get(k) is None}}

    def _prepare_inputs(self, request: Mapping[str, Any], index: int, cache: dict) -> PreparedInputs | None:
        """Read and check the request's init image and mask (no upload yet)."""
        if not isinstance(request, Mapping) or all(request.get(k) is None for k in ("init_image", "mask", "loras")):
            return None
        found = {}
        for field, mode in (("init_image", "RGB"), ("mask", "L")):
            source = request.get(field)
            if source is None:
                continue
            ident = (mode, hashlib.sha256(source).hexdigest() if isinstance(source, (bytes, bytearray)) else str(source))
            if ident not in cache:
                cache[ident] = prepare_image(source, field=field, limits=self.settings.limits, mode=mode, index=index)
            found[field] = cache[ident]
        from farm import loras

        resolved = loras.resolve(self, request.get("loras"), index=index) if request.get("loras") else ()
        return PreparedInputs(init=found.get("init_image"), mask=found.get("mask"), loras=resolved)

    def add_lora(self, source: str | Path | bytes, name: str):
        """Register a LoRA (safetensors, diffusers or kohya layout) under ``name``; see ``farm.loras``."""
        from farm import loras

        return loras.add(self, source, name)

    def list_loras(self):
        from farm import loras

        return loras.listing(self)

    def remove_lora(self, name: str) -> None:
        from farm import loras

        loras.remove(self, name)

    def submission(self, submission_id: str) -> Submission:
        with self.sessions() as session:
            if session.get(SubmissionRecord, submission_id) is None:
                raise NotFound(f"no submission {submission_id!r}: check the id, or FARM_DATABASE_URL")
        return Submission(self, submission_id)

    def latest(self, limit: int = 10) -> list[Submission]:
        with self.sessions() as session:
            ids = session.scalars(
                select(SubmissionRecord.id).order_by(SubmissionRecord.created_at.desc()).limit(limit)
            ).all()
        return [Submission(self, submission_id) for submission_id in ids]

    def recover_expired(self) -> int:
        """Queue again the images of workers that died holding them; returns the tasks published."""
        grouped = lifecycle.take_back_expired(self.sessions)
        if not grouped:
            return 0
        return submissions.publish(
            self.celery, submissions.regrouped(grouped), self.settings, submission_id="(recovered)", sessions=self.sessions
        )


def _result(row: ImageRecord, storage: Storage) -> ImageResult:
    return ImageResult(
        id=row.id,
        position=row.position,
        status=row.status,
        prompt=row.prompt,
        negative_prompt=row.negative_prompt,
        seed=row.seed,
        steps=row.steps,
        guidance_scale=row.guidance_scale,
        width=row.width,
        height=row.height,
        scheduler=row.scheduler,
        model=row.model,
        model_path=row.model_path,
        storage_key=row.storage_key,
        uri=storage.uri(row.storage_key) if row.storage_key else None,
        error=row.error,
        worker=row.worker,
        attempts=row.attempts,
        queued_at=row.queued_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        gpu_seconds=row.gpu_seconds,
        prompt_tokens=row.prompt_tokens,
        prompt_truncated=row.prompt_truncated,
        info=row.info,
        loras=row.params.get("loras") or [],
    )

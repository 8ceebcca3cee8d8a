"""LoRA training jobs, the light side: checked and recorded at submit, published to the model's queue,
claimed by a worker with a lease (``workers.training``), followed here.

    submit(services, name="purple", data="shapes-campaign", model="shapes", steps=300)

``data`` is one of

* a campaign's name: its succeeded images, their prompts as captions (read from the database);
* an imagefolder directory (``metadata.jsonl`` with ``file_name`` and a caption column ``text`` or
  ``caption``; ``farm campaign export --format imagefolder`` writes one under ``train/``, found too);
* the same folder in the farm's storage, by its URI (``file:///…``, ``s3://bucket/prefix``).

Everything is checked before anything is written (one :class:`~farm.errors.ValidationError`, field,
value and limit): the dataset is not empty, every row has a caption and an image that decodes, the
resolution is one the model takes, the model is configured, the LoRA name is free. A folder's images
are uploaded once, by content (``training-data/<sha256>.png``), so any worker reads the same data; the
dataset (storage keys and captions) is frozen in the job's params, so a resumed job trains on what the
first attempt did.

Job states: queued → running → succeeded | failed | canceled. Claims, leases and the outbox mark
(``publish_after``) work as for images (``farm.lifecycle``): a worker claims the job with a lease it
renews while training; a job whose worker died (lease expired) is claimed again and resumes from
its last checkpoint. No torch here (tests/unit/test_light_import.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select, update

from farm.db.tables import (
    CampaignRecord, ImageRecord, LoraRecord, Status, TrainingJobRecord, TrainingState, utcnow,
)
from farm.errors import NotFound, PublishError, ValidationError
from farm.loras import NAME
from farm.request.text import shown
from farm.storage.keys import content_key

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

    from farm.services import Services
    from farm.settings import Settings

__all__ = [
    "TRAIN_TASK", "cancel", "claim", "heartbeat", "publish_job", "recover", "resolve_dataset", "status", "submit",
]

log = logging.getLogger("farm.training")

#: The task name workers register for a training job (``workers.training.task``).
TRAIN_TASK = "farm.train_lora"

DEFAULTS: dict[str, Any] = {
    "rank": 4,
    "steps": 500,
    "lr": 1e-4,
    "batch_size": 4,
    "resolution": None,  # the model's own render size (its farm.json), else FARM_DEFAULT_SIZE
    "text_encoder": False,
    "checkpoint_every": 100,
    "sample_every": 0,  # 0: samples only at the end
    "seed": None,  # drawn at submit and recorded
    "gradient_checkpointing": False,
    "offset_noise": 0.0,  # a per-channel constant added to the noise (models trained with offset noise: shapes 0.3)
    "min_snr_gamma": 5.0,  # Min-SNR-γ loss weighting; 0: plain MSE
}
#: Bounds of each number a job takes.
BOUNDS: dict[str, tuple[float, float]] = {
    "rank": (1, 256),
    "steps": (1, 1_000_000),
    "lr": (1e-8, 1.0),
    "batch_size": (1, 256),
    "checkpoint_every": (1, 1_000_000),
    "sample_every": (0, 1_000_000),
    "seed": (0, 2**63 - 1),
    "offset_noise": (0.0, 1.0),
    "min_snr_gamma": (0.0, 100.0),
}
#: Images one job may train on (their keys and captions travel in the job's params).
MAX_IMAGES = 50_000
#: Captions of the sample images rendered while training (the first distinct ones of the dataset).
SAMPLE_PROMPTS = 4
CAPTION_COLUMNS = ("text", "caption")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# -- submit ----------------------------------------------------------------------------------------

def submit(
    services: "Services",
    *,
    name: str,
    data: str | Path,
    model: str | None = None,
    rank: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    resolution: int | None = None,
    text_encoder: bool | None = None,
    checkpoint_every: int | None = None,
    sample_every: int | None = None,
    seed: int | None = None,
    gradient_checkpointing: bool | None = None,
    offset_noise: float | None = None,
    min_snr_gamma: float | None = None,
    sample_prompts: list[str] | None = None,
) -> TrainingJobRecord:
    """Check a training job, record it (queued) and publish it to the model's queue; return its record.

    Raises :class:`~farm.errors.ValidationError` (nothing written, nothing queued) on bad input. A
    broker that refuses is a logged warning: the job stays marked in the outbox (:func:`recover`)."""
    settings = services.settings
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValidationError("name", shown(name), "must be 1–128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    model = services.catalogue.check_name(model)
    given = {
        "rank": rank, "steps": steps, "lr": lr, "batch_size": batch_size, "resolution": resolution,
        "text_encoder": text_encoder, "checkpoint_every": checkpoint_every, "sample_every": sample_every,
        "seed": seed, "gradient_checkpointing": gradient_checkpointing, "offset_noise": offset_noise,
        "min_snr_gamma": min_snr_gamma,
    }
    params = {key: DEFAULTS[key] if value is None else value for key, value in given.items()}
    if params["seed"] is None:
        params["seed"] = random.SystemRandom().randrange(2**31)
    for key, (low, high) in BOUNDS.items():
        value = params[key]
        number = float if key in ("lr", "offset_noise", "min_snr_gamma") else int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (number is int and not isinstance(value, int)):
            raise ValidationError(key, shown(value), f"must be {'a number' if number is float else 'an integer'} in [{low:g}, {high:g}]")
        if not low <= value <= high:
            raise ValidationError(key, value, f"must be in [{low:g}, {high:g}]")
    for key in ("text_encoder", "gradient_checkpointing"):
        if not isinstance(params[key], bool):
            raise ValidationError(key, shown(params[key]), "must be true or false")
    params["resolution"] = _check_resolution(params["resolution"], services, model)
    with services.sessions() as session:
        if session.scalar(select(LoraRecord.id).where(LoraRecord.name == name)) is not None:
            raise ValidationError("name", name, "is taken by a registered LoRA: `farm lora rm` it first, or pick another name")
        if session.scalar(select(TrainingJobRecord.id).where(TrainingJobRecord.name == name)) is not None:
            raise ValidationError("name", name, "is taken by another training job (`farm train status NAME`): pick another name")
    dataset = resolve_dataset(services, data)
    if sample_prompts is None:
        sample_prompts = list(dict.fromkeys(item["text"] for item in dataset["items"]))[:SAMPLE_PROMPTS]
    params["sample_prompts"] = list(sample_prompts)
    dataset["upload"]()  # everything is valid: store a folder's images (by content; once each)
    # in a stable order (caption, key), whatever order the files were listed in: with content keys
    # (a folder) the same images train the same way whatever their file names
    items = sorted(dataset["items"], key=lambda item: (item["text"], item["key"]))
    params["dataset"] = {"kind": dataset["kind"], "items": items}
    now = utcnow()
    job = TrainingJobRecord(
        id=str(uuid.uuid4()), name=name, model=model, data=str(data), params=params,
        state=TrainingState.queued.value, step=0, total_steps=params["steps"], attempts=0,
        task_id=str(uuid.uuid4()), publish_after=now, created_at=now, info={},
    )
    with services.sessions.begin() as session:
        session.add(job)
    try:
        publish_job(services.sessions, services.celery, settings, job.id)
    except PublishError as exc:
        log.warning("%s", exc)
    with services.sessions() as session:
        record = session.get(TrainingJobRecord, job.id)
        session.expunge(record)
        return record


def _check_resolution(value: Any, services: "Services", model: str) -> int:
    limits = services.settings.limits
    if value is None:
        value = services.catalogue.defaults(model).width
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("resolution", shown(value), "must be an integer (pixels, a multiple of 8)")
    if value % 8:
        raise ValidationError("resolution", value, f"must be a multiple of 8 (e.g. {value - value % 8 or 8} or {value - value % 8 + 8})")
    if not limits.min_size <= value <= limits.max_size:
        raise ValidationError("resolution", value, f"must be in [{limits.min_size}, {limits.max_size}] (FARM_LIMITS__MIN_SIZE/MAX_SIZE)")
    return value


def resolve_dataset(services: "Services", data: str | Path) -> dict[str, Any]:
    """``{"kind", "items": [{"key", "text"}], "upload"}``: the dataset named by ``data``, checked.
    ``upload()`` stores what is not in storage yet (a local folder's images); call it once all is valid."""
    if not isinstance(data, (str, Path)) or not str(data).strip():
        raise ValidationError("data", shown(data), "must name a campaign, an imagefolder directory or its storage URI")
    text = str(data)
    with services.sessions() as session:
        campaign = session.scalar(select(CampaignRecord).where(CampaignRecord.name == text)) if isinstance(data, str) else None
        if campaign is not None:
            rows = session.execute(
                select(ImageRecord.storage_key, ImageRecord.prompt)
                .where(ImageRecord.campaign_id == campaign.id, ImageRecord.status == Status.succeeded.value)
                .order_by(ImageRecord.id)
                .limit(MAX_IMAGES + 1)
            ).all()
    if campaign is not None:
        if not rows:
            raise ValidationError("data", text, "campaign has no succeeded images yet: an empty dataset (`farm campaign wait` first)")
        if len(rows) > MAX_IMAGES:
            raise ValidationError("data", text, f"campaign has more than {MAX_IMAGES} succeeded images; at most {MAX_IMAGES} per job")
        items = []
        for key, prompt in rows:
            if not key or not prompt or not prompt.strip():
                raise ValidationError("data", text, f"campaign image {key!r} has no prompt to caption it")
            items.append({"key": key, "text": prompt})
        return {"kind": "campaign", "items": items, "upload": lambda: None}
    storage = services.storage
    if "://" in text:
        prefix = storage.key_of(text)
        if prefix is None:
            raise ValidationError("data", text, f"is not a campaign name and not a URI in the farm's storage ({storage.uri('…')[:-1]}…)")
        return _storage_folder(services, text, prefix.rstrip("/"))
    folder = Path(text).expanduser()
    if folder.is_dir():
        return _local_folder(services, text, folder)
    raise ValidationError("data", text, "is not a campaign, an imagefolder directory (with metadata.jsonl) or a storage URI")


def _rows(label: str, where: str, body: bytes) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(body.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValidationError("data", label, f"{where} line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise ValidationError("data", label, f"{where} line {number} is not an object")
        rows.append((number, row))
    if not rows:
        raise ValidationError("data", label, f"{where} lists no image: an empty dataset")
    if len(rows) > MAX_IMAGES:
        raise ValidationError("data", label, f"{where} lists {len(rows)} images; at most {MAX_IMAGES} per job")
    return rows


def _caption(label: str, where: str, number: int, row: dict) -> tuple[str, str]:
    name = row.get("file_name")
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in Path(name).parts:
        raise ValidationError("data", label, f"{where} line {number} has no usable file_name (a relative path): {shown(name)!r}")
    caption = next((row[c] for c in CAPTION_COLUMNS if isinstance(row.get(c), str) and row[c].strip()), None)
    if caption is None:
        raise ValidationError("data", label, f"{where} line {number} ({name}) has no caption: a non-empty 'text' or 'caption' column is needed")
    return name, caption


def _check_image(label: str, name: str, body: bytes, limits) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(body)) as image:
            width, height = image.size
            if width * height > limits.max_input_pixels:
                raise ValidationError("data", label, f"image {name} is {width}x{height}; at most {limits.max_input_pixels} pixels")
            image.load()
    except ValidationError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Pillow says, it is not an image we can train on
        raise ValidationError("data", label, f"image {name} cannot be read ({type(exc).__name__}: {exc})") from None
    if min(width, height) < limits.min_input_side:
        raise ValidationError("data", label, f"image {name} is {width}x{height}; each side at least {limits.min_input_side} px")


def _metadata_in(folder_has) -> str | None:
    for where in ("metadata.jsonl", "train/metadata.jsonl"):
        if folder_has(where):
            return where
    return None


def _local_folder(services: "Services", label: str, folder: Path) -> dict[str, Any]:
    where = _metadata_in(lambda rel: (folder / rel).is_file())
    if where is None:
        raise ValidationError("data", label, "has no metadata.jsonl (file_name + text/caption per image), nor train/metadata.jsonl")
    base = (folder / where).parent
    limits = services.settings.limits
    items, bodies = [], {}
    for number, row in _rows(label, where, (folder / where).read_bytes()):
        name, caption = _caption(label, where, number, row)
        path = base / name
        if not path.is_file():
            raise ValidationError("data", label, f"{where} line {number}: image {name} does not exist")
        if path.stat().st_size > limits.max_input_bytes:
            raise ValidationError("data", label, f"image {name} is {path.stat().st_size} bytes; at most {limits.max_input_bytes}")
        body = path.read_bytes()
        _check_image(label, name, body, limits)
        sha = hashlib.sha256(body).hexdigest()
        key = content_key("training_data", sha, _ext(name))
        bodies[key] = body
        items.append({"key": key, "text": caption})

    def upload() -> None:
        storage = services.storage
        for key, body in bodies.items():
            if not storage.exists(key):
                storage.put(key, body, content_type="application/octet-stream")

    return {"kind": "folder", "items": items, "upload": upload}


def _storage_folder(services: "Services", label: str, prefix: str) -> dict[str, Any]:
    storage = services.storage
    join = (lambda rel: f"{prefix}/{rel}") if prefix else (lambda rel: rel)
    where = _metadata_in(lambda rel: storage.exists(join(rel)))
    if where is None:
        raise ValidationError("data", label, "has no metadata.jsonl (file_name + text/caption per image), nor train/metadata.jsonl")
    base = where.rpartition("/")[0]
    limits = services.settings.limits
    items = []
    for number, row in _rows(label, where, storage.get(join(where))):
        name, caption = _caption(label, where, number, row)
        key = join(f"{base}/{name}" if base else name)
        if not storage.exists(key):
            raise ValidationError("data", label, f"{where} line {number}: image {name} is not in storage")
        _check_image(label, name, storage.get(key), limits)
        items.append({"key": key, "text": caption})
    return {"kind": "storage", "items": items, "upload": lambda: None}


def _ext(name: str) -> str:
    suffix = Path(name).suffix.lower().lstrip(".")
    return suffix if suffix.isalnum() and suffix else "img"


# -- publishing ------------------------------------------------------------------------------------

def publish_job(sessions: "sessionmaker[Session]", app: "Celery", settings: "Settings", job_id: str, *, countdown: float | None = None) -> None:
    """Send the job's task message to its model's queue and clear its outbox mark. Raises
    :class:`~farm.errors.PublishError` when the broker refuses (the mark stays: :func:`recover`)."""
    with sessions() as session:
        job = session.get(TrainingJobRecord, job_id)
        if job is None:
            raise NotFound(f"no training job {job_id!r}")
        task_id, model, name, steps = job.task_id or str(uuid.uuid4()), job.model, job.name, job.total_steps
    try:
        message = app.amqp.create_task_message(
            task_id, TRAIN_TASK, (), {"job_id": job_id, "model": model}, countdown=countdown,
            argsrepr=f"train {name}", kwargsrepr=f"{model} · LoRA {name!r}, {steps} steps",
        )
        with app.producer_or_acquire() as producer:
            producer.publish(
                message.body, exchange="", routing_key=settings.queue_for(model), serializer="json",
                headers=message.headers, retry=False, **message.properties,
            )
    except Exception as exc:  # noqa: BLE001
        raise PublishError(
            f"training job {name!r}: its task did not reach the broker ({type(exc).__name__}: {exc}); "
            "it stays queued and marked: `farm train recover` (or farm.training.recover) publishes it"
        ) from exc
    with sessions.begin() as session:
        session.execute(update(TrainingJobRecord).where(TrainingJobRecord.id == job_id).values(publish_after=None))


def recover(
    services: "Services", *, grace_seconds: float = 0.0, older_than: float = 0.0, lost_messages: bool = False
) -> list[str]:
    """Queue again the jobs whose worker died (lease expired ``grace_seconds`` ago) and publish every
    job marked in the outbox for ``older_than`` seconds; with ``lost_messages`` (the broker may have
    lost its messages: Redis restarted empty) also every queued job published before. Returns the
    names published. Safe to run anywhere, any time: claims are guarded, a duplicate message finds
    its job taken or done. The reconciler runs it each round."""
    now = utcnow()
    queued = TrainingJobRecord.state == TrainingState.queued.value
    with services.sessions.begin() as session:
        lapsed = and_(
            TrainingJobRecord.state == TrainingState.running.value,
            TrainingJobRecord.lease_expires_at < now - timedelta(seconds=grace_seconds),
        )
        expired = session.execute(
            select(TrainingJobRecord.id, TrainingJobRecord.name).where(lapsed).with_for_update()
        ).all()
        if expired:
            session.execute(
                update(TrainingJobRecord)
                .where(TrainingJobRecord.id.in_([job_id for job_id, _ in expired]), lapsed)
                .values(state=TrainingState.queued.value, claim_token=None, lease_expires_at=None, publish_after=now)
            )
        due_before = now - timedelta(seconds=older_than)
        marked = TrainingJobRecord.publish_after <= due_before
        if lost_messages:
            marked = or_(marked, and_(TrainingJobRecord.publish_after.is_(None), TrainingJobRecord.created_at <= due_before))
        due = list(expired) + [
            row for row in session.execute(select(TrainingJobRecord.id, TrainingJobRecord.name).where(queued, marked)).all()
            if row[0] not in {job_id for job_id, _ in expired}
        ]
    for job_id, _ in due:
        publish_job(services.sessions, services.celery, services.settings, job_id)
    return [name for _, name in due]


# -- following --------------------------------------------------------------------------------------

def _job(session, name: str) -> TrainingJobRecord:
    job = session.scalar(select(TrainingJobRecord).where(TrainingJobRecord.name == name))
    if job is None:
        raise NotFound(f"no training job named {name!r}: `farm train lora --name {name} …` starts one")
    return job


def status(services: "Services", name: str) -> dict[str, Any]:
    """The job called ``name`` as a dict: state, step, total_steps, loss, eta_seconds, checkpoint, …"""
    with services.sessions() as session:
        job = _job(session, name)
        info = dict(job.info or {})
        return {
            "name": job.name, "id": job.id, "model": job.model, "data": job.data, "state": job.state,
            "step": job.step, "total_steps": job.total_steps, "loss": job.loss,
            "eta_seconds": info.get("eta_seconds") if job.state == TrainingState.running.value else None,
            "checkpoint_step": job.checkpoint_step, "checkpoint_key": job.checkpoint_key, "attempts": job.attempts,
            "worker": job.worker, "error": job.error,
            "created_at": _iso(job.created_at), "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
            "lora": info.get("lora"), "samples": info.get("samples", {}),
            "params": {k: v for k, v in (job.params or {}).items() if k != "dataset"},
            "images": len((job.params or {}).get("dataset", {}).get("items", [])),
        }


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def cancel(services: "Services", name: str) -> bool:
    """Cancel a queued or running job (a running one stops at its next heartbeat)."""
    with services.sessions.begin() as session:
        _job(session, name)
        return bool(session.execute(
            update(TrainingJobRecord)
            .where(TrainingJobRecord.name == name, TrainingJobRecord.state.in_([TrainingState.queued.value, TrainingState.running.value]))
            .values(state=TrainingState.canceled.value, finished_at=utcnow(), lease_expires_at=None, error="canceled")
        ).rowcount)


# -- the worker's transitions (guarded updates, as farm.lifecycle's) ---------------------------------

def claim(
    sessions: "sessionmaker[Session]", job_id: str, *, worker: str, lease_seconds: float, max_attempts: int,
) -> tuple[str | None, TrainingJobRecord | None]:
    """``(token, job)`` when this worker now holds the job (queued, or running under an expired lease:
    its worker died); ``(None, job)`` when it does not (finished, canceled or held under a live lease)."""
    now = utcnow()
    token = str(uuid.uuid4())
    with sessions.begin() as session:
        session.execute(
            update(TrainingJobRecord)
            .where(
                TrainingJobRecord.id == job_id,
                or_(
                    TrainingJobRecord.state == TrainingState.queued.value,
                    and_(TrainingJobRecord.state == TrainingState.running.value, TrainingJobRecord.lease_expires_at < now),
                ),
            )
            .values(
                state=TrainingState.running.value, claim_token=token, worker=worker,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=TrainingJobRecord.attempts + 1, publish_after=None,
                # a new attempt starts from the last checkpoint: status shows that, not the dead attempt's step
                step=func.coalesce(TrainingJobRecord.checkpoint_step, 0),
            )
        )
        job = session.get(TrainingJobRecord, job_id)
        if job is None:
            return None, None
        if job.claim_token != token:
            session.expunge(job)
            return None, job
        if job.started_at is None:
            job.started_at = now
        if job.attempts > max_attempts:
            job.state = TrainingState.failed.value
            job.finished_at = now
            job.error = f"gave up after {max_attempts} attempts; the last one: {job.error or 'its worker stopped'}"
            session.flush()
            session.expunge(job)
            return None, job
        session.flush()
        session.expunge(job)
        return token, job


def heartbeat(
    sessions: "sessionmaker[Session]", token: str, lease_seconds: float, *, step: int | None = None,
    loss: float | None = None, info: dict | None = None, checkpoint: tuple[str, int] | None = None,
) -> bool:
    """Renew the lease (and record progress); False when the claim is gone (canceled, taken over)."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_seconds)}
    if step is not None:
        values["step"] = step
    if loss is not None:
        values["loss"] = loss
    if info is not None:
        values["info"] = info
    if checkpoint is not None:
        values["checkpoint_key"], values["checkpoint_step"] = checkpoint
    with sessions.begin() as session:
        return bool(session.execute(
            update(TrainingJobRecord)
            .where(TrainingJobRecord.claim_token == token, TrainingJobRecord.state == TrainingState.running.value)
            .values(**values)
        ).rowcount)


def finish(sessions: "sessionmaker[Session]", token: str, *, state: TrainingState, error: str | None = None, **values: Any) -> bool:
    """End the claim's job as ``state`` (succeeded or failed) with ``values``; False if the claim was lost."""
    with sessions.begin() as session:
        return bool(session.execute(
            update(TrainingJobRecord)
            .where(TrainingJobRecord.claim_token == token, TrainingJobRecord.state == TrainingState.running.value)
            .values(state=state.value, finished_at=utcnow(), lease_expires_at=None, error=(error or None) and error[:4000], **values)
        ).rowcount)


def release(sessions: "sessionmaker[Session]", token: str, note: str) -> bool:
    """Give the job back to the queue (a warm shutdown, an outage: not the job's fault; no attempt
    counted), marked for publishing."""
    with sessions.begin() as session:
        return bool(session.execute(
            update(TrainingJobRecord)
            .where(TrainingJobRecord.claim_token == token, TrainingJobRecord.state == TrainingState.running.value)
            .values(state=TrainingState.queued.value, claim_token=None, lease_expires_at=None, worker=None,
                    attempts=TrainingJobRecord.attempts - 1, error=note, publish_after=utcnow())
        ).rowcount)

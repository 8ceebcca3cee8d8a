"""``/v1/campaigns``: campaigns through the API, owned by the key that made them (run in a thread).

A campaign is submitted as a multipart upload of a prompt file (the formats ``farm campaign submit``
reads: ``.jsonl``, ``.csv``, ``.parquet``) with the CLI's options as form fields (``name``, ``sweep``
repeated, ``priority``, ``dry_run``). The upload is written to a private temporary folder under its
own (cleaned) file name and handed to :meth:`farm.campaigns.Campaign.submit` exactly as the CLI
hands it a path: the same parsing, checks, caps and error lines. The owner row (``api_campaigns``)
is written in the submit's one transaction (both committed, or neither). Other keys get 404.

One difference from the CLI: a prompt file sent to the API may not name input images by local
path (they would be the server's files); it names them by a URI under the farm's storage.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from farm.api.keys import Caller
from farm.db.tables import ApiCampaignRecord, CampaignRecord, ImageRecord, Status, utcnow
from farm.errors import FarmError, NotFound, ValidationError
from farm.request.intake import Intake
from farm.request.text import shown
from farm.storage.base import META_SUFFIX

__all__ = ["Conflict", "Upload", "campaign_view", "control", "export_archive", "listing", "manifest_lines",
           "owned", "parse_upload", "submit"]

#: Form fields of ``POST /v1/campaigns`` besides the file (the options of ``farm campaign submit``).
FORM_FIELDS = ("name", "sweep", "priority", "dry_run")
_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Conflict(FarmError):
    """The campaign name belongs to another caller (or to a campaign made outside the API): 409."""


def _taken(name: str) -> Conflict:
    return Conflict(f"campaign name {shown(name)!r} is taken: choose another name")


# -- the upload -------------------------------------------------------------------------------------
@dataclass
class Upload:
    filename: str | None = None
    data: bytes | None = None
    fields: dict[str, list[str]] = field(default_factory=dict)


def parse_upload(content_type: str | None, body: bytes) -> Upload:
    """The file part and the form fields of a ``multipart/form-data`` body (the standard library's
    MIME parser: no extra dependency); a ValidationError names what is wrong."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise ValidationError(
            "Content-Type", shown(content_type or ""), "must be multipart/form-data with a 'file' part (the prompt file) "
            "and a 'name' field (curl -F file=@prompts.csv -F name=NAME)",
        )
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ValidationError("Content-Type", shown(content_type), "names no boundary, or the body is not multipart")
    upload = Upload()
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "file":
            if upload.data is not None:
                raise ValidationError("file", "2 files", "one prompt file per campaign submit")
            upload.filename, upload.data = part.get_filename(), payload
            continue
        if name not in FORM_FIELDS:
            raise ValidationError("form field", shown(name), f"is unknown; the fields are file, {', '.join(FORM_FIELDS)}")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationError(name, shown(payload[:60]), "must be UTF-8 text") from None
        upload.fields.setdefault(name, []).append(text)
    if upload.data is None:
        raise ValidationError("file", None, "is required: the prompt file (.jsonl, .csv or .parquet) as the multipart part 'file'")
    return upload


def _one(upload: Upload, name: str) -> str | None:
    values = upload.fields.get(name) or []
    if len(values) > 1:
        raise ValidationError(name, shown(values), "is given more than once")
    return values[0] if values else None


def _safe_filename(filename: str | None) -> str:
    """The upload's own file name (errors name it: ``prompts.csv line 3``), cleaned to a plain name."""
    name = Path((filename or "").replace("\\", "/")).name
    name = re.sub(r"[^\w.\- ]", "_", name).strip(" .") or ""
    suffix = Path(name).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValidationError("file", shown(filename or ""), "must be a file name ending in .jsonl, .csv or .parquet "
                              "(the format is read from it)")
    stem = name[: -len(suffix)][:100] or "prompts"
    return stem + suffix


class _ApiIntake(Intake):
    """The farm's request path, except that input images may not be local paths (the server's files)."""

    def _locate(self, source: Any, field: str, index: int | None, base_dir: Path | None) -> Any:
        if isinstance(source, (str, Path)) and "://" not in str(source):
            raise ValidationError(
                field, shown(str(source)), "is a local path; a prompt file sent to the API names input images by a URI "
                "under the farm's storage", index=index,
            )
        return super()._locate(source, field, index, base_dir)


def _campaign(farm, name: str):
    from farm.campaigns import Campaign

    def intake() -> Intake:
        made = farm.intake()  # the farm's own request path (its registry, storage, checks)…
        made.__class__ = _ApiIntake  # …refusing local paths
        return made

    return Campaign(farm.services, name, intake=intake)


# -- submit -----------------------------------------------------------------------------------------
def submit(farm, caller: Caller, upload: Upload) -> dict[str, Any]:
    """``POST /v1/campaigns``: expand the uploaded prompt file × sweeps and queue what is new.

    Submitting again to the caller's own campaign adds only what is new (as the CLI does); a name
    held by anyone else is a :class:`Conflict`."""
    name = _one(upload, "name")
    if name is None or not name.strip():
        raise ValidationError("name", shown(name or ""), "is required: the campaign's name (re-submitting to it adds only what is new)")
    priority_text, dry_text = _one(upload, "priority"), _one(upload, "dry_run")
    priority = None
    if priority_text not in (None, ""):
        try:
            priority = int(priority_text.strip())
        except ValueError:
            raise ValidationError("priority", shown(priority_text), "must be an integer between 0 (first) and 9 (last)") from None
    dry_run = False
    if dry_text not in (None, ""):
        if dry_text.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValidationError("dry_run", shown(dry_text), "must be true or false")
        dry_run = dry_text.strip().lower() in ("true", "1", "yes")
    sweeps = list(upload.fields.get("sweep") or [])
    filename = _safe_filename(upload.filename)
    campaign = _campaign(farm, name)
    _check_free(farm, name, caller)  # early, read-only (dry runs too); the transaction checks again

    def own(session, record: CampaignRecord, created: bool) -> None:
        owner = session.get(ApiCampaignRecord, record.id)
        if owner is None and created:
            session.add(ApiCampaignRecord(campaign_id=record.id, key_id=caller.id, created_at=utcnow()))
        elif owner is None or owner.key_id != caller.id:
            raise _taken(name)

    folder = tempfile.mkdtemp(prefix="farm-api-upload-")
    try:
        path = Path(folder) / filename
        path.write_bytes(upload.data or b"")
        try:
            report = campaign.submit(path, sweeps=sweeps, dry_run=dry_run, priority=priority, in_transaction=own)
        except IntegrityError:
            _check_free(farm, name, caller)  # the same new name, made at the same moment by someone else: 409
            raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    answer: dict[str, Any] = {
        "name": name, "total": report.total, "new": report.new, "existing": report.existing,
        "published_again": report.published_again,
        "estimated_gpu_seconds": round(report.estimated_gpu_seconds, 3), "dry_run": report.dry_run,
        "broker_error": report.broker_error, "summary": str(report),
    }
    if not dry_run:
        record = owned(farm, name, caller)
        answer.update(id=record.id, url=f"/v1/campaigns/{record.id}")
    return answer


def _check_free(farm, name: str, caller: Caller) -> None:
    with farm.sessions() as session:
        row = session.execute(
            select(CampaignRecord.id, ApiCampaignRecord.campaign_id, ApiCampaignRecord.key_id)
            .outerjoin(ApiCampaignRecord, ApiCampaignRecord.campaign_id == CampaignRecord.id)
            .where(CampaignRecord.name == name)
        ).first()
    if row is not None and (row[1] is None or row[2] != caller.id):
        raise _taken(name)


# -- reading back -----------------------------------------------------------------------------------
def _mine(caller: Caller):
    return ApiCampaignRecord.key_id.is_(None) if caller.id is None else ApiCampaignRecord.key_id == caller.id


def owned(farm, name_or_id: str, caller: Caller) -> CampaignRecord:
    """The caller's campaign by id or name; NotFound for anyone else's (the same answer as a missing one)."""
    if not isinstance(name_or_id, str) or not name_or_id:
        raise NotFound(f"no campaign {shown(name_or_id)!r}")
    by_id = bool(_UUID.fullmatch(name_or_id))
    with farm.sessions() as session:
        query = select(CampaignRecord).join(ApiCampaignRecord, ApiCampaignRecord.campaign_id == CampaignRecord.id).where(_mine(caller))
        record = session.scalar(query.where(CampaignRecord.id == name_or_id)) if by_id else None
        if record is None:
            record = session.scalar(query.where(CampaignRecord.name == name_or_id))
        if record is not None:
            session.expunge(record)
    if record is None:
        raise NotFound(f"no campaign {shown(name_or_id)!r}")
    return record


def listing(farm, caller: Caller) -> dict[str, Any]:
    """``GET /v1/campaigns``: the caller's campaigns, newest first, with their counts by status."""
    with farm.sessions() as session:
        records = list(session.scalars(
            select(CampaignRecord).join(ApiCampaignRecord, ApiCampaignRecord.campaign_id == CampaignRecord.id)
            .where(_mine(caller)).order_by(CampaignRecord.created_at.desc(), CampaignRecord.name)
        ))
        found: dict[str, dict[str, int]] = {}
        ids = [record.id for record in records]
        for start in range(0, len(ids), 500):
            for campaign_id, status, count in session.execute(
                select(ImageRecord.campaign_id, ImageRecord.status, func.count())
                .where(ImageRecord.campaign_id.in_(ids[start : start + 500]))
                .group_by(ImageRecord.campaign_id, ImageRecord.status)
            ):
                found.setdefault(campaign_id, {})[status] = int(count)
        session.expunge_all()
    campaigns = []
    for record in records:
        counts = {s.value: found.get(record.id, {}).get(s.value, 0) for s in Status}
        campaigns.append({
            "id": record.id, "name": record.name, "state": record.state, "created_at": _iso(record.created_at),
            "counts": counts, "total": sum(counts.values()), "finished": _finished(counts),
            "url": f"/v1/campaigns/{record.id}",
        })
    return {"campaigns": campaigns}


def _finished(counts: dict[str, int]) -> int:
    from farm.db.tables import FINISHED

    return sum(counts.get(s.value, 0) for s in FINISHED)


def campaign_view(farm, record: CampaignRecord) -> dict[str, Any]:
    """``GET /v1/campaigns/{id}``: what ``farm campaign status`` says, as JSON."""
    status = _campaign(farm, record.name).status()
    return {
        "id": record.id, "name": record.name, "state": status.state, "priority": record.priority,
        "created_at": _iso(record.created_at),
        "counts": status.counts, "total": status.total, "finished": status.finished,
        "progress": round(status.steps_done / status.steps_total, 4) if status.steps_total else 0.0,
        "steps_done": status.steps_done, "steps_total": status.steps_total,
        "images_per_s": status.images_per_s, "eta_seconds": status.eta_seconds,
        "failures": {kind: {"count": count, "example": example} for kind, (count, example) in status.failures.items()},
        "summary": str(status),
        "export_url": f"/v1/campaigns/{record.id}/export", "manifest_url": f"/v1/campaigns/{record.id}/manifest",
    }


#: ``POST /v1/campaigns/{id}/{action}`` → the handle's method (what ``farm campaign ACTION`` calls).
ACTIONS = {"pause": "pause", "resume": "resume", "cancel": "cancel", "retry-failed": "retry_failed"}


def control(farm, record: CampaignRecord, action: str) -> dict[str, Any]:
    if action not in ACTIONS:
        raise NotFound(f"no campaign action {shown(action)!r}: {', '.join(ACTIONS)}")
    count = getattr(_campaign(farm, record.name), ACTIONS[action])()
    return {"id": record.id, "name": record.name, "action": action, "images": count}


# -- export -----------------------------------------------------------------------------------------
def export_archive(farm, record: CampaignRecord, *, fmt: str, shard_size: int) -> tuple[Path, int]:
    """The campaign's finished images exported as ``farm campaign export`` writes them
    (``farm.campaigns.export``), in one tar file; ``(tar path, images)``. The caller removes the
    tar's folder (``path.parent``) once it is sent."""
    folder = Path(tempfile.mkdtemp(prefix="farm-api-export-"))
    try:
        tree = folder / "export"
        report = _campaign(farm, record.name).export(str(tree), fmt=fmt, shard_size=shard_size)
        archive = folder / "export.tar"
        with tarfile.open(archive, "w") as tar:
            if tree.exists():
                for path in sorted(tree.rglob("*")):
                    # the dataset's files, not the file storage's sidecars (content types)
                    if path.is_file() and not path.name.endswith(META_SUFFIX):
                        tar.add(path, arcname=path.relative_to(tree).as_posix(), recursive=False)
        shutil.rmtree(tree, ignore_errors=True)  # only the tar stays while it is sent
        return archive, report.exported
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def presigner(storage, expires: int):
    """``key → URL`` for S3 storage (a presigned GET valid ``expires`` seconds), else None."""
    client, bucket = getattr(storage, "client", None), getattr(storage, "bucket", None)
    if client is None or bucket is None or not hasattr(storage, "object_key"):
        return None
    return lambda key: client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": storage.object_key(key)}, ExpiresIn=expires
    )


def manifest_lines(farm, record: CampaignRecord, *, expires: int) -> Iterator[bytes]:
    """``GET /v1/campaigns/{id}/manifest``: one JSON line per finished image: the metadata an export
    writes (``farm.campaigns.export.metadata``) and ``url``: presigned on S3 storage, else the API's
    own ``/v1/campaigns/{id}/images/{image_id}`` (the same key needed)."""
    import json

    from farm.campaigns.export import metadata

    sign = presigner(farm.storage, expires)
    for image in _campaign(farm, record.name).images():
        row = {"file_name": f"{image.id}.png", **metadata(image, record.name)}
        row["url"] = sign(image.storage_key) if sign else f"/v1/campaigns/{record.id}/images/{image.id}"
        yield (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode()


def image_png(farm, record: CampaignRecord, image_id: str) -> bytes:
    with farm.sessions() as session:
        key = session.scalar(select(ImageRecord.storage_key).where(
            ImageRecord.id == image_id, ImageRecord.campaign_id == record.id, ImageRecord.status == Status.succeeded.value,
        ))
    if not key:
        raise NotFound(f"campaign {record.name!r} has no finished image {shown(image_id)!r}")
    return farm.storage.get(key)


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def archive_name(name: str) -> str:
    """A campaign's name as a plain file name (the export's ``Content-Disposition``)."""
    return re.sub(r"[^\w.\-]", "_", name)[:100].strip("._") or "campaign"

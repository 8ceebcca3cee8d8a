"""What the API does with the farm, synchronously (run in a thread): submit through the one request
path and record who owns the job, look jobs up for their owner only, and build the answers."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from typing import Any, Mapping

from sqlalchemy import case, func, select

from farm import lifecycle
from farm.api.keys import Caller
from farm.db.tables import FINISHED, ApiJobRecord, ImageRecord, Status, utcnow
from farm.errors import NotFound, ValidationError
from farm.imaging.pnginfo import read_png_metadata, sampler_fields
from farm.request.text import shown

__all__ = ["a1111_answer", "cancel_unfinished", "job_view", "owned", "progress", "submit", "unfinished_jobs"]

_UNFINISHED = [Status.queued.value, Status.running.value, Status.paused.value]
_CALLBACK_MAX = 2048


def check_callback(url: Any) -> str | None:
    if url is None or url == "":
        return None
    if not isinstance(url, str) or len(url) > _CALLBACK_MAX or not url.startswith(("http://", "https://")) or any(
        c.isspace() for c in url
    ):
        raise ValidationError("callback_url", shown(url), f"must be an http(s) URL of at most {_CALLBACK_MAX} characters")
    return url


def submit(farm, request: Mapping[str, Any], caller: Caller, *, kind: str, callback_url: str | None = None,
           echo: Mapping[str, Any] | None = None) -> str:
    """Submit ``request`` through ``Farm.submit_many`` (the one request path); the owner row is
    written in the transaction that records the submission (both committed, or neither)."""

    def own(session, submission_id: str) -> None:
        session.add(ApiJobRecord(
            submission_id=submission_id, key_id=caller.id, kind=kind, created_at=utcnow(),
            request=dict(echo or {}), callback_url=callback_url,
            webhook_state="pending" if callback_url else None, webhook_attempts=0,
        ))

    submission = farm.submit_many([dict(request)], label=f"api:{caller.name}", in_transaction=own)
    return submission.id


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def owned(farm, submission_id: str, caller: Caller) -> ApiJobRecord:
    """The caller's job ``submission_id``; NotFound for anyone else's (same answer as a missing one)."""
    if not isinstance(submission_id, str) or not _UUID.fullmatch(submission_id):
        raise NotFound(f"no job {shown(submission_id)!r}: job ids are UUIDs")
    with farm.sessions() as session:
        job = session.get(ApiJobRecord, submission_id)
    if job is None or job.key_id != caller.id:
        raise NotFound(f"no job {submission_id!r}")
    return job


def unfinished_jobs(farm, caller: Caller) -> list[str]:
    with farm.sessions() as session:
        return list(session.scalars(
            select(ApiJobRecord.submission_id).distinct()
            .join(ImageRecord, ImageRecord.submission_id == ApiJobRecord.submission_id)
            .where(ApiJobRecord.key_id.is_(None) if caller.id is None else ApiJobRecord.key_id == caller.id)
            .where(ImageRecord.status.in_(_UNFINISHED))
        ))


def cancel_unfinished(farm, caller: Caller) -> int:
    ids = unfinished_jobs(farm, caller)
    if not ids:
        return 0
    return lifecycle.cancel(farm.sessions, ImageRecord.submission_id.in_(ids), reason="interrupted through the API")


def progress(farm, caller: Caller) -> dict[str, Any]:
    """``GET /sdapi/v1/progress`` over the caller's own unfinished jobs."""
    ids = unfinished_jobs(farm, caller)
    done = total = 0
    if ids:
        with farm.sessions() as session:
            done, total = lifecycle.steps(session, ImageRecord.submission_id.in_(ids))
    return {
        "progress": (done / total) if total else 0.0,
        "eta_relative": 0.0,
        "state": {
            "skipped": False, "interrupted": False, "job": ids[0] if ids else "", "job_count": len(ids),
            "job_timestamp": "", "job_no": 0, "sampling_step": done, "sampling_steps": total,
        },
        "current_image": None,
        "textinfo": None,
    }


def _rows(farm, submission_id: str) -> list[ImageRecord]:
    with farm.sessions() as session:
        return list(session.scalars(
            select(ImageRecord).where(ImageRecord.submission_id == submission_id).order_by(ImageRecord.position)
        ))


def _state(rows: list[ImageRecord]) -> str:
    states = {row.status for row in rows}
    if states <= {Status.succeeded.value, Status.filtered.value}:  # withheld by safety=drop: done as asked
        return "succeeded"
    if states & set(_UNFINISHED):
        return "running" if Status.running.value in states or Status.succeeded.value in states else "queued"
    if Status.succeeded.value in states:
        return "partial"
    return "failed" if Status.failed.value in states else "canceled"


def job_view(farm, job: ApiJobRecord, *, base_url: str = "") -> dict[str, Any]:
    """``GET /v1/jobs/{id}``: status, per-image progress and (proxied) image URLs."""
    rows = _rows(farm, job.submission_id)
    images = []
    for row in rows:
        steps = row.steps or 1
        done = steps if row.status in {s.value for s in FINISHED} else (row.steps_done or 0)
        images.append({
            "position": row.position, "seed": row.seed, "status": row.status,
            "progress": round(min(done / steps, 1.0), 4) if row.status != Status.queued.value else 0.0,
            "url": f"{base_url}/v1/jobs/{job.submission_id}/images/{row.position}" if row.storage_key else None,
            "error": row.error,
            "flagged": row.flagged,
        })
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    total = sum((row.steps or 0) for row in rows) or 1
    done = sum(
        (row.steps or 0) if row.status in {s.value for s in FINISHED} else (row.steps_done or 0) for row in rows
    )
    return {
        "id": job.submission_id,
        "kind": job.kind,
        "status": _state(rows),
        "done": all(row.status in {s.value for s in FINISHED} for row in rows),
        "progress": round(done / total, 4),
        "counts": counts,
        "created_at": _iso(job.created_at),
        "images": images,
        "webhook": None if job.webhook_state is None else {
            "state": job.webhook_state, "attempts": job.webhook_attempts, "error": job.webhook_error,
        },
    }


def image_png(farm, job: ApiJobRecord, position: int) -> bytes:
    for row in _rows(farm, job.submission_id):
        if row.position == position and row.storage_key:
            return farm.storage.get(row.storage_key)
    raise NotFound(f"job {job.submission_id} has no finished image at position {position}")


def a1111_answer(farm, job: ApiJobRecord, *, send_images: bool = True) -> tuple[int, dict[str, Any]]:
    """``(status code, body)`` of a finished A1111 request: images (base64 PNGs with their
    ``parameters`` chunk, as stored), the request as ``parameters``, and ``info`` (a JSON string)."""
    rows = _rows(farm, job.submission_id)
    ok = [row for row in rows if row.status == Status.succeeded.value and row.storage_key]
    failed = [row for row in rows if row.status == Status.failed.value]
    if not ok and failed:
        return 500, {"error": "RenderFailed", "detail": f"{len(failed)} image(s) failed: {failed[0].error}",
                     "job_id": job.submission_id}
    images, infotexts = [], []
    for row in ok:
        data = farm.storage.get(row.storage_key)
        try:
            infotexts.append(read_png_metadata(data)[0] or "")
        except ValueError:
            infotexts.append("")
        if send_images:
            images.append(base64.b64encode(data).decode("ascii"))
    first = rows[0] if rows else None
    params = dict(first.params) if first is not None else {}
    sampler = sampler_fields(first.scheduler) if first is not None else {}
    info = {
        "prompt": first.prompt if first else "",
        "all_prompts": [row.prompt for row in ok],
        "negative_prompt": first.negative_prompt if first else "",
        "all_negative_prompts": [row.negative_prompt for row in ok],
        "seed": first.seed if first else None,
        "all_seeds": [row.seed for row in ok],
        "subseed": -1, "all_subseeds": [-1 for _ in ok], "subseed_strength": 0,
        "width": first.width if first else None,
        "height": first.height if first else None,
        "sampler_name": sampler.get("Sampler"),
        "scheduler": (sampler.get("Schedule type") or "Automatic"),
        "cfg_scale": first.guidance_scale if first else None,
        "steps": first.steps if first else None,
        "batch_size": len(rows),
        "restore_faces": False,
        "sd_model_name": first.model if first else None,
        "sd_model_hash": ((ok[0].info or {}).get("model_hash") if ok else None),
        "denoising_strength": params.get("strength"),
        "clip_skip": params.get("clip_skip", 1),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": first.queued_at.strftime("%Y%m%d%H%M%S") if first and first.queued_at else "",
        "is_using_inpainting_conditioning": params.get("mode") == "inpaint",
        "farm": {
            "job_id": job.submission_id, "image_ids": [row.id for row in ok],
            "canceled": sum(row.status == Status.canceled.value for row in rows),
            "failed": [{"seed": row.seed, "error": row.error} for row in failed],
        },
    }
    return 200, {"images": images, "parameters": dict(job.request or {}), "info": json.dumps(info)}


def finished(farm, submission_ids: list[str]) -> set[str]:
    """Those of ``submission_ids`` whose every image finished (one query for them all)."""
    if not submission_ids:
        return set()
    done_values = [s.value for s in FINISHED]
    with farm.sessions() as session:
        rows = session.execute(
            select(ImageRecord.submission_id, func.count(), func.sum(case((ImageRecord.status.in_(done_values), 1), else_=0)))
            .where(ImageRecord.submission_id.in_(submission_ids))
            .group_by(ImageRecord.submission_id)
        ).all()
    return {sid for sid, total, done in rows if total == done}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None

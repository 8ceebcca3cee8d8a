"""The read model: one image as a user sees it, built from its record in one place.

Submissions (``Submission.results``), campaigns (``Campaign.images``), ``farm download``'s
``metadata.jsonl`` and the dataset exports all read images through :func:`image_result`, so each
shows every parameter the image was rendered with (mode, strength, clip skip, mask blur, LoRAs…),
not a hand-picked subset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from farm.db.tables import ImageRecord
from farm.request.spec import ImageSpec
from farm.storage import Storage

__all__ = ["ImageResult", "image_result"]


@dataclass(frozen=True)
class ImageResult:
    """One image: what was asked (every parameter of its :class:`~farm.request.spec.ImageSpec`),
    where it is in its life, and what came of it."""

    id: str
    submission_id: str
    campaign_id: str | None
    position: int
    status: str
    # what was asked
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    model: str
    mode: str
    strength: float | None
    resize_mode: str
    mask_blur: int
    paste_back: bool
    clip_skip: int
    init_image_key: str | None
    mask_key: str | None
    #: [[sha256, weight], …] as requested
    loras: list
    #: the safety policy asked for (off | flag | blur | drop)
    safety: str
    #: textual-inversion embeddings the prompts use: [{"name", "sha256"}, …] (``farm.embeddings``)
    embeddings: list
    # where it is
    attempts: int
    worker: str | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    # what came of it
    storage_key: str | None
    uri: str | None
    error: str | None
    gpu_seconds: float | None
    prompt_tokens: int | None
    prompt_truncated: bool | None
    model_path: str | None
    #: what the worker recorded: model hash, device, batch size, and each LoRA with how it was
    #: served ("cache": already loaded, "disk": the worker's disk cache, "download": from storage)
    info: dict | None = None
    #: the safety checker's verdict (None: not checked, policy off) and its record:
    #: ``{"policy", "flagged", "checker", "scores": {"nsfw", "special"…}}``
    flagged: bool | None = None
    safety_verdict: dict | None = None

    def metadata(self) -> dict[str, Any]:
        """Every field as one JSON-ready dict (a line of ``metadata.jsonl``, an export's metadata)."""
        data = asdict(self)
        for key in ("queued_at", "started_at", "finished_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


def image_result(row: ImageRecord, storage: Storage | None) -> ImageResult:
    """The :class:`ImageResult` of an image record (``storage`` gives its URI; None: no URI)."""
    spec = ImageSpec.from_params(row.params)
    asked = spec.params()
    asked.pop("request_index", None)
    asked["loras"] = [[sha, weight] for sha, weight in spec.loras]
    asked["embeddings"] = [{"name": name, "sha256": sha} for name, sha in spec.embeddings]
    return ImageResult(
        **asked,
        id=row.id,
        submission_id=row.submission_id,
        campaign_id=row.campaign_id,
        position=row.position,
        status=row.status,
        attempts=row.attempts,
        worker=row.worker,
        queued_at=row.queued_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        storage_key=row.storage_key,
        uri=storage.uri(row.storage_key) if storage is not None and row.storage_key else None,
        error=row.error,
        gpu_seconds=row.gpu_seconds,
        prompt_tokens=row.prompt_tokens,
        prompt_truncated=row.prompt_truncated,
        model_path=row.model_path,
        info=row.info,
        flagged=row.flagged,
        safety_verdict=row.safety,
    )

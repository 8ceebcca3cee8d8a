"""Export a campaign's finished images as a dataset training code reads directly.

- ``imagefolder``: ``DEST/train/<image id>.png`` + ``DEST/train/metadata.jsonl`` (``file_name``,
  ``text`` = the prompt, and every parameter): ``datasets.load_dataset("imagefolder", data_dir=DEST)``.
- ``webdataset``: ``DEST/shard-000000.tar``… with ``<id>.png``, ``<id>.txt`` (prompt) and ``<id>.json``
  (parameters) per image, plus ``DEST/manifest.jsonl`` listing what each shard holds.

DEST is a folder or an ``s3://bucket/prefix``. Export streams (one image in memory at a time, shards
spooled to a temporary file) and can run while the campaign renders: it takes succeeded images only,
and a later run adds only what an earlier one did not export.

Safety (``workers.finishing.safety``): images the checker withheld (status ``filtered``, policy
``drop``) have no PNG and are left out; every exported row carries ``safety`` (the policy asked),
``flagged`` and ``safety_verdict`` (scores, checker, action), so a dataset can be filtered further.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.errors import ValidationError
from farm.storage import Storage, open_storage

if TYPE_CHECKING:
    from farm.campaigns.submit import Campaign
    from farm.results import ImageResult

FORMATS = ("imagefolder", "webdataset")


@dataclass
class ExportReport:
    destination: str
    format: str
    exported: int
    already: int

    def __str__(self) -> str:
        return f"{self.exported} image(s) exported to {self.destination} ({self.format}); {self.already} were already there"


def destination(campaign: "Campaign", dest: str) -> Storage:
    settings = campaign._services.settings
    url = dest if "://" in dest else Path(dest).resolve().as_uri()
    return open_storage(settings.model_copy(update={"storage_url": url}))


def metadata(image: "ImageResult", campaign: str) -> dict[str, Any]:
    """An exported image's metadata: ``text`` (the prompt, what ``datasets`` reads as the caption),
    every parameter of the image's read model, and the campaign's name."""
    data = image.metadata()
    data["image_id"] = data.pop("id")
    data.pop("info")  # what the worker recorded (device, cache hits), not how the image was made
    return {"text": image.prompt, **data, "campaign": campaign}


def export(campaign: "Campaign", dest: str, *, fmt: str = "imagefolder", shard_size: int = 1000) -> ExportReport:
    if fmt not in FORMATS:
        raise ValidationError("format", fmt, f"must be one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ValidationError("shard_size", shard_size, "must be at least 1")
    target = destination(campaign, dest)
    source = campaign._services.storage
    if fmt == "imagefolder":
        exported, already = _imagefolder(campaign, source, target)
    else:
        exported, already = _webdataset(campaign, source, target, shard_size)
    return ExportReport(destination=dest, format=fmt, exported=exported, already=already)


def _read_lines(storage: Storage, key: str) -> list[dict[str, Any]]:
    if not storage.exists(key):
        return []
    return [json.loads(line) for line in storage.get(key).decode().splitlines() if line.strip()]


def _imagefolder(campaign: "Campaign", source: Storage, target: Storage) -> tuple[int, int]:
    meta_key = "train/metadata.jsonl"
    done = {row["image_id"] for row in _read_lines(target, meta_key)}
    exported = 0
    with tempfile.TemporaryFile() as spool:
        if done:
            spool.write(target.get(meta_key))
        for image in campaign.images():
            if image.id in done:
                continue
            name = f"{image.id}.png"
            target.put(f"train/{name}", source.get(image.storage_key), content_type="image/png")
            row = {"file_name": name, **metadata(image, campaign.name)}
            spool.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
            exported += 1
        if exported:
            spool.seek(0)
            target.put(meta_key, spool.read(), content_type="application/x-ndjson")
    return exported, len(done)


def _webdataset(campaign: "Campaign", source: Storage, target: Storage, shard_size: int) -> tuple[int, int]:
    manifest_key = "manifest.jsonl"
    manifest = _read_lines(target, manifest_key)
    done = {image_id for shard in manifest for image_id in shard["image_ids"]}
    exported = 0
    pending: list["ImageResult"] = []

    def flush() -> None:
        nonlocal pending
        name = f"shard-{len(manifest):06d}.tar"
        with tempfile.TemporaryFile() as spool:
            with tarfile.open(fileobj=spool, mode="w") as tar:
                for image in pending:
                    meta = metadata(image, campaign.name)
                    for suffix, data in (
                        ("png", source.get(image.storage_key)),
                        ("txt", image.prompt.encode()),
                        ("json", json.dumps(meta, ensure_ascii=False).encode()),
                    ):
                        info = tarfile.TarInfo(f"{image.id}.{suffix}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            spool.seek(0)
            target.put(name, spool.read(), content_type="application/x-tar")
        manifest.append({"shard": name, "image_ids": [image.id for image in pending]})
        # the manifest is written after each shard, so an interrupted export resumes after it
        body = "".join(json.dumps(shard) + "\n" for shard in manifest).encode()
        target.put(manifest_key, body, content_type="application/x-ndjson")
        pending = []

    for image in campaign.images():
        if image.id in done:
            continue
        pending.append(image)
        exported += 1
        if len(pending) >= shard_size:
            flush()
    if pending:
        flush()
    return exported, len(done)

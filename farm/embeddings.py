"""The textual-inversion embedding registry: safetensors files checked at registration, stored once
by content, used by name in prompts as AUTOMATIC1111 does (``"photo, easynegative"``).

Accepted layouts (read from the safetensors JSON header alone: nothing is unpickled, no tensor is
loaded here):

* ``a1111``: ``emb_params`` of shape ``[n, width]`` (A1111's safetensors export), or one
  ``string_to_param.*`` tensor (the ``.pt`` layout's dict, flattened into safetensors);
* ``diffusers``: one tensor named after its token (``learned_embeds.safetensors``:
  ``{"<cat-toy>": [width]}`` or ``[n, width]``).

The vectors' width must be a text encoder's width the farm serves: 768 for SD1.x (CLIP ViT-L/14),
or a configured model's ``text_encoder/config.json`` ``hidden_size`` when its folder is readable
here (the tiny test models). SDXL files (``clip_l`` + ``clip_g``) and other widths are refused,
naming the file, its width and the expected one.

At submit, :class:`Matcher` finds which registered names a request's prompt and negative prompt
use (a name used as a word, case-insensitively, as CLIP's lower-casing tokenizer sees it) and the
request path records ``((name, sha256), …)`` in each image's spec, so a later rename or removal
cannot change a queued image, and workers expand exactly those names
(``workers.diffusion.embeddings``).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from sqlalchemy import func, select

from farm.db.tables import EmbeddingRecord, utcnow
from farm import registry
from farm.errors import ValidationError
from farm.request.text import shown
from farm.storage.keys import content_key

if TYPE_CHECKING:
    from farm.services import Services

__all__ = [
    "EmbeddingInfo", "Matcher", "SD1_WIDTH", "add", "inspect", "listing", "matcher", "remove",
]

#: SD1.x's text encoder width (CLIP ViT-L/14).
SD1_WIDTH = 768
#: An embedding file larger than this is not an embedding (75 fp32 vectors of 768 are 230 kB).
MAX_EMBEDDING_BYTES = 8 * 1024 * 1024
#: Vectors one embedding may stand for: one 75-token window, as in A1111.
MAX_VECTORS = 75
#: A name is a prompt word: letters, digits, ``.``, ``_``, ``-``, with at least one letter.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Words of the prompt syntax that cannot be embedding names.
RESERVED = frozenset({"break", "and"})
FLOAT_DTYPES = ("F16", "F32", "BF16", "F64")


@dataclass(frozen=True)
class EmbeddingInfo:
    sha256: str
    size: int
    format: str  # a1111 | diffusers
    vectors: int
    width: int
    #: the tensor holding the vectors
    tensor: str
    #: what the width fits: "sd1" or a configured model's name
    base: str

    @property
    def key(self) -> str:
        return content_key("embeddings", self.sha256, "safetensors")


def _refuse(label: Any, limit: str) -> ValidationError:
    return ValidationError("embedding", label, limit)


def _load(source: str | Path | bytes) -> tuple[bytes, Any]:
    """``(data, label)``: the bytes of an embedding file (a regular file, read once, size-capped)."""
    return registry.read_file(
        source, field="embedding", max_bytes=MAX_EMBEDDING_BYTES, cap=" (an embedding's size cap)",
        convert="convert it on a machine you trust (load it and save its vectors with "
        "safetensors.torch.save_file({'emb_params': …}))",
    )


def _widths(services: "Services | None") -> dict[int, str]:
    """Text encoder widths an embedding may have: SD1.x's, then each readable configured model's."""
    widths = {SD1_WIDTH: "sd1"}
    if services is None:
        return widths
    catalogue = services.catalogue
    for name in catalogue.names:
        try:
            folder = catalogue.folder(name)
        except Exception:  # noqa: BLE001 - an unreadable location fits nothing
            continue
        config = folder / "text_encoder" / "config.json" if folder is not None else None
        if config is not None and config.is_file():
            try:
                width = int(json.loads(config.read_text())["hidden_size"])
            except (ValueError, KeyError, TypeError, OSError):
                continue
            widths.setdefault(width, name)
    return widths


def inspect(services: "Services | None", source: str | Path | bytes) -> EmbeddingInfo:
    """Check an embedding file; raise :class:`~farm.errors.ValidationError` saying what is wrong."""
    data, label = _load(source)
    return _inspect(services, data, label)


def _inspect(services: "Services | None", data: bytes, label: Any) -> EmbeddingInfo:
    from farm.loras import _header

    try:
        header = _header(data, label)
    except ValidationError as exc:
        if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":  # a pickle's PROTO opcode, torch.save's zip
            raise _refuse(label, "is a pickle/zip (torch.save) file: farm loads safetensors only and never unpickles") from None
        raise _refuse(label, exc.limit) from None
    keys = sorted(header)
    if not keys:
        raise _refuse(label, "holds no tensor")
    if {"clip_l", "clip_g"} & set(keys):
        raise _refuse(label, "is an SDXL embedding (clip_l/clip_g): the farm serves SD1.x models")
    if "emb_params" in header:
        tensor, layout = "emb_params", "a1111"
    else:
        a1111 = [k for k in keys if k.startswith("string_to_param.")]
        if len(a1111) == 1:
            tensor, layout = a1111[0], "a1111"
        elif len(keys) == 1 and not a1111:
            tensor, layout = keys[0], "diffusers"
        else:
            raise _refuse(
                label, f"has tensors {[shown(k) for k in keys[:6]]}: expected one embedding tensor (A1111 'emb_params' or "
                "'string_to_param.*', or diffusers' single '<token>')",
            )
    meta = header[tensor]
    shape, dtype = meta["shape"], meta["dtype"]
    if dtype not in FLOAT_DTYPES:
        raise _refuse(label, f"tensor {shown(tensor)!r} has dtype {dtype}; embeddings are floating point")
    if len(shape) == 1:
        vectors, width = 1, shape[0]
    elif len(shape) == 2:
        vectors, width = shape
    else:
        raise _refuse(label, f"tensor {shown(tensor)!r} has shape {shape}; expected [vectors, width] or [width]")
    if not 1 <= vectors <= MAX_VECTORS:
        raise _refuse(label, f"has {vectors} vectors; an embedding has 1 to {MAX_VECTORS}")
    widths = _widths(services)
    if width not in widths:
        others = ", ".join(f"{w} ({name})" for w, name in sorted(widths.items()) if w != SD1_WIDTH)
        raise _refuse(
            label, f"has vectors of width {width}; expected {SD1_WIDTH} (SD1.x's CLIP ViT-L/14 text encoder"
            + (f"; or a configured model's: {others}" if others else "") + "): is it an SD2 (1024) or SDXL embedding?",
        )
    return EmbeddingInfo(
        sha256=hashlib.sha256(data).hexdigest(), size=len(data), format=layout, vectors=vectors, width=width,
        tensor=tensor, base=widths[width],
    )


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or not re.search(r"[A-Za-z]", name):
        raise ValidationError(
            "name", shown(name), "must be 1–128 letters, digits, '.', '_' or '-', with a letter, starting with a "
            "letter or digit: it is the word prompts use",
        )
    if name.lower() in RESERVED:
        raise ValidationError("name", name, "is a word of the prompt syntax (BREAK, AND); pick another name")
    return name


def add(services: "Services", source: str | Path | bytes, name: str) -> EmbeddingRecord:
    """Check, upload (once, by content) and register an embedding under ``name`` (its prompt word)."""
    check_name(name)
    data, label = _load(source)  # read once: what is checked is what is stored
    info = _inspect(services, data, label)
    with services.sessions() as session:
        taken = session.scalar(select(EmbeddingRecord.name).where(func.lower(EmbeddingRecord.name) == name.lower()))
        if taken is not None:
            raise ValidationError(
                "name", name, f"is taken (by {taken!r}; names match prompts case-insensitively): "
                "`farm embedding remove` it first, or pick another name",
            )
    record = EmbeddingRecord(
        id=str(uuid.uuid4()), name=name, sha256=info.sha256, size=info.size, format=info.format,
        vectors=info.vectors, width=info.width, storage_key=info.key, created_at=utcnow(),
    )
    return registry.register(services, info.key, data, record)


def listing(services: "Services") -> list[EmbeddingRecord]:
    return registry.listing(services, EmbeddingRecord)


def remove(services: "Services", name: str) -> None:
    """Forget a name (the stored file stays: queued and past images name it by sha256)."""
    registry.remove(services, EmbeddingRecord, name, what="embedding", command="farm embedding list")


class Matcher:
    """Finds the registered names a prompt uses, as words (case-insensitive).

    The boundary follows CLIP's pre-tokenizer, which splits text into runs of letters, single digits
    and runs of other characters: a name that starts (ends) with a letter must not be preceded
    (followed) by a letter. ``"photo, EasyNegative"`` and ``"(easynegative:1.2)"`` use
    ``easynegative``; ``"easynegatives"`` does not. Longer names win where two overlap.
    """

    def __init__(self, names: Iterable[tuple[str, str]]):
        self._sha = {name.lower(): (name, sha) for name, sha in names}
        if not self._sha:
            self._pattern = None
            return
        parts = []
        for lowered in sorted(self._sha, key=lambda n: (-len(n), n)):
            before = r"(?<![^\W\d_])" if lowered[0].isalpha() else ""
            after = r"(?![^\W\d_])" if lowered[-1].isalpha() else ""
            parts.append(before + re.escape(lowered) + after)
        self._pattern = re.compile("|".join(parts), re.IGNORECASE)

    def __bool__(self) -> bool:
        return self._pattern is not None

    def find(self, *texts: Any) -> tuple[tuple[str, str], ...]:
        """``((name, sha256), …)`` sorted, of the names ``texts`` use (non-strings are skipped)."""
        if self._pattern is None:
            return ()
        found = set()
        for text in texts:
            if isinstance(text, str) and text:
                for match in self._pattern.finditer(text):
                    found.add(self._sha[match.group(0).lower()])
        return tuple(sorted(found))


def matcher(services: "Services") -> Matcher:
    """A :class:`Matcher` over the registry as it is now (one query)."""
    with services.sessions() as session:
        return Matcher(session.execute(select(EmbeddingRecord.name, EmbeddingRecord.sha256)).all())

"""What the LoRA and embedding registries share: a safetensors file read safely once, stored once by
content, and a name for it in a table (:mod:`farm.loras`, :mod:`farm.embeddings`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from farm.errors import NotFound, ValidationError
from farm.request.text import shown_path

if TYPE_CHECKING:
    from farm.services import Services

__all__ = ["PICKLE_SUFFIXES", "listing", "read_file", "register", "remove"]

#: Files farm never reads: they unpickle (run code) when loaded.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})


def read_file(source: str | Path | bytes, *, field: str, max_bytes: int, cap: str, convert: str) -> tuple[bytes, Any]:
    """``(data, label)``: the bytes of a safetensors file given as a path or bytes; a regular file,
    read once (what is checked is what is stored), at most ``max_bytes`` (``cap`` says where that
    limit comes from). Raises :class:`ValidationError` on ``field`` naming the file and what is wrong;
    a pickle's message ends with ``convert`` (how to make a safetensors file of it)."""
    too_big = lambda size: ValidationError(field, label, f"is {size} bytes; at most {max_bytes}{cap}")  # noqa: E731
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label: Any = f"<{len(data)} bytes>"
    elif isinstance(source, (str, Path)):
        label = shown_path(source)
        path = Path(source)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ValidationError(
                field, label, f"is a pickle file: farm loads safetensors only and never unpickles; {convert}"
            )
        try:  # O_NONBLOCK: a pipe must not block the open (regular files ignore it)
            handle = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
        except FileNotFoundError:
            raise ValidationError(field, label, "does not exist") from None
        except (OSError, ValueError) as exc:
            raise ValidationError(field, label, f"cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
        with handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device or pipe"
                raise ValidationError(field, label, f"is {kind}, not a safetensors file")
            if info.st_size > max_bytes:
                raise too_big(info.st_size)
            data = handle.read(max_bytes + 1)
    else:
        raise ValidationError(field, type(source).__name__, "must be a file path or bytes")
    if len(data) > max_bytes:
        raise too_big(len(data))
    return data, label


def register(services: "Services", key: str, data: bytes, record: Any) -> Any:
    """Store ``data`` under its content key (once: the same file is stored once whatever its names),
    then add its named ``record``."""
    if not services.storage.exists(key):
        services.storage.put(key, data, content_type="application/octet-stream")
    with services.sessions.begin() as session:
        session.add(record)
    return record


def listing(services: "Services", table: Any) -> list[Any]:
    """Every record of a registry ``table``, by name."""
    with services.sessions() as session:
        return list(session.scalars(select(table).order_by(table.name)))


def remove(services: "Services", table: Any, name: str, *, what: str, command: str) -> None:
    """Forget a name (the stored file stays: queued and past images name it by sha256)."""
    with services.sessions.begin() as session:
        record = session.scalar(select(table).where(table.name == name))
        if record is None:
            raise NotFound(f"no {what} named {name!r}: `{command}` shows them")
        session.delete(record)

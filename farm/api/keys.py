"""API keys: made once, shown once, stored as sha256; read from ``Authorization: Bearer KEY`` or as
the password of HTTP Basic auth (what A1111 clients such as webuiapi's ``set_auth`` send)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select

from farm.db.tables import ApiKeyRecord, utcnow
from farm.errors import NotFound, ValidationError

__all__ = ["KEY_PREFIX", "Caller", "create", "hash_key", "key_from_header", "listing", "lookup", "parse_rate", "revoke"]

KEY_PREFIX = "farm_"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KEY = re.compile(r"farm_[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class Caller:
    """Who is asking: a key's id and name and limits (``id`` None: ``--no-auth``, the loopback user)."""

    id: str | None
    name: str
    rate: float | None = None
    concurrency: int | None = None
    webhook_secret: str | None = None
    options: dict | None = None


ANONYMOUS = Caller(id=None, name="anonymous")


def new_key() -> str:
    """``farm_`` + 32 random bytes, base64url (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_from_header(authorization: str | None) -> str | None:
    """The key in an ``Authorization`` header: ``Bearer KEY``, or Basic auth whose password is the
    key (any user name). None when the header is absent or holds no well-formed key."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        key = value
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        _, sep, key = decoded.partition(":")
        if not sep:
            return None
    else:
        return None
    return key if _KEY.fullmatch(key) else None


def parse_rate(text: str | None) -> float | None:
    """``"5/s"``, ``"5"``, ``"120/m"`` → requests per second; None/"" → unlimited."""
    if text is None or text == "":
        return None
    number, _, unit = str(text).strip().partition("/")
    per = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}.get(unit.strip().lower())
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if per is None or not value > 0 or value == float("inf"):
        raise ValidationError("rate", text, "must be N/s, N/m or N/h with N > 0 (e.g. 5/s)")
    return value / per


def create(sessions, name: str, *, rate: float | None = None, concurrency: int | None = None) -> tuple[ApiKeyRecord, str]:
    """Make a key called ``name``; returns its record and the key (shown once, never stored)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValidationError("name", name, "must be 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if concurrency is not None and concurrency < 1:
        raise ValidationError("concurrency", concurrency, "must be at least 1")
    key = new_key()
    record = ApiKeyRecord(
        id=str(uuid.uuid4()), name=name, key_hash=hash_key(key), prefix=key[:12], created_at=utcnow(),
        rate=rate, concurrency=concurrency, webhook_secret=secrets.token_hex(32), options={},
    )
    with sessions.begin() as session:
        if session.scalar(select(ApiKeyRecord.id).where(ApiKeyRecord.name == name)) is not None:
            raise ValidationError("name", name, "is taken by another key (revoke it, or choose another name)")
        session.add(record)
    return record, key


def listing(sessions) -> list[ApiKeyRecord]:
    with sessions() as session:
        return list(session.scalars(select(ApiKeyRecord).order_by(ApiKeyRecord.created_at)))


def revoke(sessions, name: str) -> None:
    with sessions.begin() as session:
        record = session.scalar(select(ApiKeyRecord).where(ApiKeyRecord.name == name))
        if record is None:
            raise NotFound(f"no API key named {name!r} (`farm api-key list`)")
        if record.revoked_at is None:
            record.revoked_at = utcnow()
        # the name is freed for a new key; the record stays so its jobs keep their owner
        record.name = f"{name[:80]}~revoked~{record.id[:8]}"


def lookup(sessions, key: str) -> Caller | None:
    """The caller a key belongs to, or None (unknown or revoked)."""
    with sessions() as session:
        record = session.scalar(select(ApiKeyRecord).where(ApiKeyRecord.key_hash == hash_key(key)))
        if record is None or record.revoked_at is not None:
            return None
        return Caller(
            id=record.id, name=record.name, rate=record.rate, concurrency=record.concurrency,
            webhook_secret=record.webhook_secret, options=dict(record.options or {}),
        )

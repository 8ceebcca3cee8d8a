"""Where images (and later LoRAs and input images) are kept: S3 or a local folder, one contract.

This module holds the contract (:class:`Storage`, :class:`MissingObject`,
:class:`StorageUnavailable` for "no answer, try later", :func:`time_limit` for a caller's deadline,
the key and metadata checks both backends apply), the local backend :class:`FileStorage`,
:func:`atomic_write` and :func:`open_storage`, which turns ``settings.storage`` into a backend:

* ``s3://bucket[/prefix]``: :class:`farm.storage.s3.S3Storage` (AWS, MinIO, R2, moto…; endpoint from
  settings or boto3's own ``AWS_ENDPOINT_URL_S3``); neither this
  module nor :mod:`farm.storage.s3` imports boto3 until an S3 storage is built,
* ``file:///abs/dir``: :class:`FileStorage` (atomic writes, metadata in a ``.meta.json`` sidecar).

Keys are relative, ``/``-separated and built by :mod:`farm.storage.keys`; both backends refuse keys that
could escape their root. User metadata is a small ``dict[str, str]`` of ids and numbers: keys are
lowercase letters, digits and dashes, values printable ASCII (S3 sends them as HTTP headers).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from farm.errors import MissingObject, ConfigError, StorageError

if TYPE_CHECKING:
    from farm.storage.s3 import S3Storage
    from farm.settings import Settings

#: Suffix of FileStorage's metadata sidecars; keys may not end with it.
META_SUFFIX = ".meta.json"
#: S3 limits user metadata to 2 KB (keys + values); keep well inside it.
MAX_METADATA_BYTES = 2048
#: Seconds to open a connection to S3, and to wait for each read from it (FARM_S3_CONNECT_TIMEOUT,
#: FARM_S3_READ_TIMEOUT): a hung server fails an attempt in about that long, not botocore's 60 s.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0

_META_KEY = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class StorageUnavailable(StorageError):
    """Raised when the store did not answer, or answered "try later", through all its attempts:
    connection refused or reset, connect or read timeout, HTTP 500/502/503/504, throttling.

    Nothing is wrong with the object or the request: the same call may work in a minute. The
    worker's finisher keeps such images in its spool and tries again (it gives back only images
    that failed otherwise: access denied, a missing bucket).
    """


# -- deadlines ------------------------------------------------------------------------------------

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("farm_storage_deadline", default=None)


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[float | None]:
    """Storage calls made inside the block start no attempt that could not end by ``seconds`` from now.

    Yields the deadline (a ``time.monotonic()`` value; None without a limit). Nested limits keep the
    earlier deadline. :class:`farm.storage.s3.S3Storage` honours it between its attempts (each attempt
    is bounded by its connect and read timeouts); :class:`FileStorage` (a local disk) ignores it.
    """
    outer = _DEADLINE.get()
    deadline = None if seconds is None else time.monotonic() + max(0.0, float(seconds))
    if outer is not None and (deadline is None or outer < deadline):
        deadline = outer
    token = _DEADLINE.set(deadline)
    try:
        yield deadline
    finally:
        _DEADLINE.reset(token)


def current_deadline() -> float | None:
    """The ``time.monotonic()`` deadline of the innermost :func:`time_limit` block, or None."""
    return _DEADLINE.get()



@runtime_checkable
class Storage(Protocol):
    """What the farm needs from an object store. Keys come from :mod:`farm.storage.keys`."""

    #: The storage URL this backend was opened from (``s3://bucket/prefix`` or ``file:///dir``).
    url: str

    def put(
        self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str] | None = None
    ) -> None:
        """Write ``data`` at ``key`` (replacing any object there) with its content type and metadata."""

    def get(self, key: str) -> bytes:
        """Return the object's bytes; :class:`MissingObject` when there is none."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""

    def delete(self, key: str) -> None:
        """Remove the object at ``key``; deleting a missing object is not an error."""

    def uri(self, key: str) -> str:
        """The object's full address (``s3://bucket/prefix/key`` or ``file:///dir/key``)."""

    def key_of(self, uri: str) -> str | None:
        """The key of an address :meth:`uri` gave; None when ``uri`` is not in this storage."""

    def head(self, key: str) -> dict[str, str]:
        """The object's user metadata; :class:`MissingObject` when there is none."""


# -- validation shared by both backends ----------------------------------------------------------


def check_key(key: object) -> str:
    """Return ``key`` if it is a safe relative object key.

    Raised as ``ValueError`` when the key is empty, absolute, contains ``\\`` or a NUL, an empty,
    ``.``/``..`` or dot-led segment, or ends with the sidecar suffix: build keys with
    :mod:`farm.storage.keys` instead of from user text.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key {key!r} is empty or not a string; build keys with farm.storage.keys")
    if key.startswith("/") or "\\" in key or "\0" in key:
        raise ValueError(f"object key {key!r} must be relative and '/'-separated; build keys with farm.storage.keys")
    for part in key.split("/"):
        if not part or part.startswith("."):
            raise ValueError(
                f"object key {key!r} has an empty, '.', '..' or dot-led segment {part!r}; "
                "build keys with farm.storage.keys"
            )
    if key.endswith(META_SUFFIX):
        raise ValueError(f"object key {key!r} ends with {META_SUFFIX!r}, which is reserved for metadata")
    return key


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """Return a copy of ``metadata`` if S3 can carry it unchanged.

    Raised as ``ValueError`` when a key is not lowercase letters, digits and dashes (S3 lowercases
    header names and proxies such as nginx drop ones with ``_``), a value is not a printable ASCII
    string (pass ids and numbers only, never prompts), or the total exceeds 2 KB.
    """
    if not metadata:
        return {}
    checked: dict[str, str] = {}
    for name, value in metadata.items():
        if not isinstance(name, str) or _META_KEY.fullmatch(name) is None:
            raise ValueError(
                f"metadata key {name!r} must be lowercase letters, digits and dashes "
                "(e.g. 'image-id'), at most 64 characters"
            )
        if not isinstance(value, str) or not (value.isascii() and value.isprintable()):
            raise ValueError(
                f"metadata value {name}={value!r} must be a printable ASCII string: "
                "store ids and numbers as metadata, put text in the object itself"
            )
        checked[name] = value
    size = sum(len(k) + len(v) for k, v in checked.items())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes; S3 allows at most {MAX_METADATA_BYTES}")
    return checked


# -- local folder ---------------------------------------------------------------------------------


class FileStorage:
    """Objects as files under ``root``; writes are atomic (temp file in the same folder + ``os.replace``).

    Each object has a sidecar ``<file>.meta.json`` holding its content type and user metadata, so
    :meth:`head` answers as S3 does.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"FileStorage({str(self.root)!r})"

    def ensure_bucket(self) -> None:
        """Create the root folder if it is missing (the local twin of :meth:`farm.storage.s3.S3Storage.ensure_bucket`)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create storage folder {self.root}: {error}; check permissions") from error

    def path(self, key: str) -> Path:
        """The file that holds ``key``; ``ValueError`` if the key would land outside the root."""
        path = self.root.joinpath(*check_key(key).split("/"))
        # A symlink inside the root could still point elsewhere: compare resolved paths.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"object key {key!r} resolves outside the storage root {self.root}")
        return path

    def _meta_path(self, path: Path) -> Path:
        return path.with_name(path.name + META_SUFFIX)

    def put(
        self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str] | None = None
    ) -> None:
        path = self.path(key)
        meta = {"content_type": content_type, "metadata": check_metadata(metadata)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Sidecar first, so a new object never shows without its metadata (each file is
            # replaced atomically; the pair is not: an overwrite may briefly pair old data, new meta).
            atomic_write(self._meta_path(path), json.dumps(meta, sort_keys=True).encode())
            atomic_write(path, bytes(data))
        except OSError as error:
            raise StorageError(
                f"cannot write {key!r} to {path}: {error}; check the folder's permissions and free space"
            ) from error

    def get(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as error:
            raise MissingObject(f"no object {key!r} in {self.url} ({path} does not exist)") from error
        except OSError as error:
            raise StorageError(f"cannot read {key!r} from {path}: {error}; check permissions") from error

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink(missing_ok=True)
            self._meta_path(path).unlink(missing_ok=True)
        except OSError as error:
            raise StorageError(f"cannot delete {key!r} at {path}: {error}; check permissions") from error

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def key_of(self, uri: str) -> str | None:
        parts = urlsplit(uri)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            return None
        path = Path(url2pathname(parts.path)).resolve()
        root = self.root.resolve()
        if root not in path.parents:
            return None
        return path.relative_to(root).as_posix()

    def head(self, key: str) -> dict[str, str]:
        return dict(self._read_meta(key)["metadata"])

    def content_type(self, key: str) -> str:
        """The content type the object was written with."""
        return str(self._read_meta(key)["content_type"])

    def _read_meta(self, key: str) -> dict[str, Any]:
        path = self.path(key)
        if not path.is_file():
            raise MissingObject(f"no object {key!r} in {self.url} ({path} does not exist)")
        try:
            return json.loads(self._meta_path(path).read_text())
        except FileNotFoundError:
            # Written by hand or by an older version: no metadata, like an S3 object without any.
            return {"content_type": "application/octet-stream", "metadata": {}}
        except (OSError, ValueError) as error:
            raise StorageError(f"cannot read metadata of {key!r} ({self._meta_path(path)}): {error}") from error


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The temp file's size is checked before the rename (a full disk can truncate silently on some
    filesystems): a short write raises ``OSError(ENOSPC)`` and leaves ``path`` as it was.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; images are meant to be served.
        written = os.path.getsize(tmp)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"writing {path} left {written} of {len(data)} bytes; disk full?")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- opening from settings ------------------------------------------------------------------------

_ACCEPTED = "'s3://bucket[/prefix]' or 'file:///absolute/dir'"


def open_storage(settings: "Settings") -> Storage:
    """The backend named by ``settings.storage``.

    Raised as :class:`ConfigError` when the URL is neither ``s3://bucket[/prefix]`` nor
    ``file:///absolute/dir``: fix ``FARM_STORAGE_URL``.
    """
    url = settings.storage
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ConfigError(f"storage URL {url!r} must not have a query or fragment; use {_ACCEPTED}")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(
                f"storage URL {url!r} is not an absolute file URL (three slashes: file:///dir); use {_ACCEPTED}"
            )
        return FileStorage(Path(url2pathname(parts.path)))
    if parts.scheme == "s3":
        bucket = parts.netloc
        if _BUCKET.fullmatch(bucket) is None:
            raise ConfigError(
                f"storage URL {url!r} names bucket {bucket!r}, which is not a valid S3 bucket name "
                f"(3-63 lowercase letters, digits, '.' and '-'); use {_ACCEPTED}"
            )
        from farm.storage.s3 import S3Storage  # here, not at the top: farm.storage.s3 imports farm.storage.base

        return S3Storage(
            bucket,
            unquote(parts.path).strip("/"),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            addressing_style=settings.s3_addressing_style,
            max_attempts=settings.s3_max_attempts,
            # read with getattr: these settings may not be declared yet in farm.settings
            connect_timeout=float(getattr(settings, "s3_connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
            read_timeout=float(getattr(settings, "s3_read_timeout", DEFAULT_READ_TIMEOUT)),
        )
    raise ConfigError(f"storage URL {url!r} is not supported; use {_ACCEPTED} (FARM_STORAGE_URL)")

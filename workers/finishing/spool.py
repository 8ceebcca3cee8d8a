"""A bounded local folder of rendered images waiting for storage; it outlives the worker process.

While storage does not answer, the :class:`~workers.finishing.finisher.Finisher` puts each rendered
PNG here instead of giving it back (a re-render) and uploads it later; a restarted worker finds its
folder as it was left and uploads what waits there first.

Layout of ``<data_dir>/spool/<worker>/`` (:func:`spool_folder`), one entry per image:

* ``<image>.<sha256>.data``: the object's bytes, named by their SHA-256 and checked against it when
  read back: a file that does not match is dropped with a warning (its image is rendered again
  once its claim's lease runs out),
* ``<image>.<sha256>.json``: the sidecar: image id, object key, claim token, content type, object
  metadata, the values to record, size, hash, creation time.

Both are written atomically (temp file, fsync, rename; then the folder is fsynced), data first, so a
sidecar always has its data; a crash between the two leaves a data file alone, removed at the next
start like any leftover temp file. Removing deletes the sidecar first for the same reason.

Bounded: :meth:`Spool.put` waits while the entries' bytes reach ``max_bytes`` (one entry is always
admitted into an empty spool, so an image larger than the bound still gets through), and
:meth:`Spool.wait_for_room` lets a producer wait before it makes more. :meth:`Spool.unbound` lifts
the bound for good (at shutdown, rendered bytes go to disk rather than being lost).

One process per folder: an exclusive ``flock`` on ``<folder>/.lock`` (released by the kernel when
the process dies, so a restarted worker takes its folder over at once).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from farm.storage.base import atomic_write

log = logging.getLogger("farm.worker.spool")

DATA_SUFFIX = ".data"
META_SUFFIX = ".json"
LOCK_NAME = ".lock"
#: Sidecar format version.
VERSION = 1

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class SpoolBusy(RuntimeError):
    """Raised when another live process holds the spool folder's lock."""


class CorruptEntry(Exception):
    """Raised by :meth:`Spool.read` for an entry whose bytes are gone or do not match their hash
    (the entry has been dropped)."""


def spool_folder(data_dir: Path | str, worker: str) -> Path:
    """``<data_dir>/spool/<worker>``, the worker's name (``gpu0@host``) made a safe folder name."""
    name = re.sub(r"[^A-Za-z0-9@._-]", "_", worker).strip(".") or "worker"
    return Path(data_dir) / "spool" / name


@dataclass(frozen=True)
class SpoolEntry:
    """One image waiting in the spool (what its sidecar holds)."""

    name: str
    image_id: str
    key: str
    token: str
    content_type: str
    sha256: str
    size: int
    created: float
    metadata: Mapping[str, str] = field(default_factory=dict)
    values: Mapping[str, Any] = field(default_factory=dict)

    def sidecar(self) -> bytes:
        data = asdict(self)
        data.pop("name")
        data["version"] = VERSION
        return json.dumps(data, sort_keys=True, allow_nan=False).encode()


class Spool:
    """Entries in ``folder``, their bytes bounded by ``max_bytes``; thread-safe, one process per folder."""

    def __init__(self, folder: Path | str, *, max_bytes: int, lock_timeout: float = 10.0):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = _take_lock(self.folder / LOCK_NAME, lock_timeout)
        self._cond = threading.Condition()
        self._entries: dict[str, SpoolEntry] = {}
        self._used = 0  # bytes of the entries, plus those being written
        self._unbounded = False
        self._closed = False
        self._scan()

    def __repr__(self) -> str:
        return f"Spool({str(self.folder)!r}, {len(self)} entries, {self.used_bytes}/{self.max_bytes} bytes)"

    # -- state --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    @property
    def used_bytes(self) -> int:
        with self._cond:
            return self._used

    @property
    def full(self) -> bool:
        with self._cond:
            return self._full()

    def _full(self) -> bool:
        return not self._unbounded and self._used >= self.max_bytes

    def entries(self) -> list[SpoolEntry]:
        """The entries, oldest first."""
        with self._cond:
            return sorted(self._entries.values(), key=lambda entry: (entry.created, entry.name))

    def tokens(self) -> set[str]:
        """The claim tokens of the entries (their leases are still worth renewing)."""
        with self._cond:
            return {entry.token for entry in self._entries.values()}

    @staticmethod
    def name_for(image_id: str, sha256: str) -> str:
        """An entry's file stem: the image id (hashed if it is not a plain id) and the bytes' hash."""
        tag = image_id if _SAFE_ID.fullmatch(image_id) else "h" + hashlib.sha256(image_id.encode()).hexdigest()[:32]
        return f"{tag}.{sha256}"

    # -- writing ------------------------------------------------------------------------------------

    def put(
        self,
        *,
        image_id: str,
        key: str,
        token: str,
        data: bytes,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> SpoolEntry:
        """Write one entry durably and return it; waits while the spool is full.

        ``TimeoutError`` if no room came within ``timeout``; ``TypeError``/``ValueError`` when
        ``values`` or ``metadata`` cannot be written as JSON; ``OSError`` from the disk. The same
        image with the same bytes replaces its entry (its sidecar takes the new token)."""
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        entry = SpoolEntry(
            name=self.name_for(image_id, sha), image_id=image_id, key=key, token=token, content_type=content_type,
            sha256=sha, size=len(data), created=time.time(), metadata=dict(metadata or {}), values=dict(values or {}),
        )
        sidecar = entry.sidecar()  # not serialisable: fail before anything is written or reserved
        with self._cond:
            self._check_open()
            replacing = entry.name in self._entries
            if not replacing:
                if not self._cond.wait_for(lambda: self._closed or not self._entries and not self._used
                                           or self._unbounded or self._used + entry.size <= self.max_bytes, timeout):
                    raise TimeoutError(f"no room in {self} for {entry.size} bytes within {timeout} s")
                self._check_open()
                self._used += entry.size  # reserved while written
        try:
            atomic_write(self._data_path(entry.name), data)
            atomic_write(self._meta_path(entry.name), sidecar)
            _fsync_dir(self.folder)
        except BaseException:
            with self._cond:
                if not replacing:
                    self._used -= entry.size
                self._cond.notify_all()
            raise
        with self._cond:
            self._entries[entry.name] = entry
            self._cond.notify_all()
        return entry

    def read(self, entry: SpoolEntry) -> bytes:
        """The entry's bytes, checked against its hash; a missing or damaged file is dropped
        (with a warning) and raises :class:`CorruptEntry`."""
        try:
            data = self._data_path(entry.name).read_bytes()
        except FileNotFoundError:
            self._drop(entry, "its data file is gone")
            raise CorruptEntry(f"spool entry {entry.name} (image {entry.image_id}) lost its data file") from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry.size or digest != entry.sha256:
            self._drop(entry, f"{len(data)} bytes with sha256 {digest[:12]}…, expected {entry.size} with {entry.sha256[:12]}…")
            raise CorruptEntry(f"spool entry {entry.name} (image {entry.image_id}) does not match its sha256")
        return data

    def remove(self, entry: SpoolEntry) -> None:
        """Forget the entry (stored and recorded, or given up): sidecar first, then its data."""
        for path in (self._meta_path(entry.name), self._data_path(entry.name)):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                log.warning("could not remove %s", path, exc_info=True)
        with self._cond:
            if self._entries.pop(entry.name, None) is not None:
                self._used -= entry.size
            self._cond.notify_all()

    # -- waiting ------------------------------------------------------------------------------------

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Wait until the spool is below its bound (or unbounded, or closed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed or not self._full(), timeout)

    def wait_empty(self, timeout: float | None = None) -> bool:
        """Wait until no entry is left; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._entries, timeout)

    def wait_changed(self, timeout: float | None = None) -> None:
        """Wait until an entry is added or removed (or ``timeout``)."""
        with self._cond:
            self._cond.wait(timeout)

    def unbound(self) -> None:
        """Admit every entry from now on, whatever its size (at shutdown: bytes to disk, not lost)."""
        with self._cond:
            self._unbounded = True
            self._cond.notify_all()

    def close(self) -> None:
        """Release the folder's lock (the entries stay for the next process); wakes waiters."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        finally:
            self._lock_file.close()

    # -- internals ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"spool {self.folder} is closed")

    def _data_path(self, name: str) -> Path:
        return self.folder / (name + DATA_SUFFIX)

    def _meta_path(self, name: str) -> Path:
        return self.folder / (name + META_SUFFIX)

    def _drop(self, entry: SpoolEntry, why: str) -> None:
        log.warning(
            "dropping spooled image %s (%s): %s; it is rendered again once its claim's lease runs out",
            entry.image_id, entry.name, why,
        )
        self.remove(entry)

    def _scan(self) -> None:
        """Index what a previous process left: complete entries kept, leftovers removed."""
        names = {path.name for path in self.folder.iterdir()}
        for file_name in sorted(names):
            path = self.folder / file_name
            if file_name == LOCK_NAME:
                continue
            if file_name.startswith(".") and file_name.endswith(".tmp"):  # atomic_write's, from a crash
                path.unlink(missing_ok=True)
            elif file_name.endswith(DATA_SUFFIX):
                if file_name[: -len(DATA_SUFFIX)] + META_SUFFIX not in names:
                    log.warning("removing %s: spooled data without its sidecar (the process stopped between the two)", path)
                    path.unlink(missing_ok=True)
            elif file_name.endswith(META_SUFFIX):
                entry = self._load(path)
                if entry is not None:
                    self._entries[entry.name] = entry
                    self._used += entry.size
        if self._entries:
            log.info("spool %s holds %d image(s), %d bytes, from a previous process", self.folder, len(self._entries), self._used)

    def _load(self, path: Path) -> SpoolEntry | None:
        name = path.name[: -len(META_SUFFIX)]
        try:
            raw = json.loads(path.read_bytes())
            if raw.get("version") != VERSION:
                raise ValueError(f"unknown version {raw.get('version')!r}")
            entry = SpoolEntry(
                name=name, image_id=str(raw["image_id"]), key=str(raw["key"]), token=str(raw["token"]),
                content_type=str(raw["content_type"]), sha256=str(raw["sha256"]), size=int(raw["size"]),
                created=float(raw["created"]), metadata=dict(raw.get("metadata") or {}), values=dict(raw.get("values") or {}),
            )
            if not _SHA256.fullmatch(entry.sha256) or name != self.name_for(entry.image_id, entry.sha256):
                raise ValueError("its name does not match its image id and sha256")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("removing spool sidecar %s: unreadable (%s)", path, error)
            path.unlink(missing_ok=True)
            self._data_path(name).unlink(missing_ok=True)
            return None
        data = self._data_path(name)
        try:
            size = data.stat().st_size
        except FileNotFoundError:
            size = -1
        if size != entry.size:
            log.warning(
                "dropping spooled image %s (%s): its data file has %s bytes, expected %d; it is rendered again "
                "once its claim's lease runs out", entry.image_id, name, size if size >= 0 else "no", entry.size,
            )
            path.unlink(missing_ok=True)
            data.unlink(missing_ok=True)
            return None
        return entry


def _take_lock(path: Path, timeout: float):
    handle = open(path, "a+b")  # noqa: SIM115 - held open for the spool's life
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                raise SpoolBusy(
                    f"spool folder {path.parent} is in use by another live process; give each worker its own "
                    "name (farm worker --name / the spool folder is <data_dir>/spool/<name>)"
                ) from None
            time.sleep(0.1)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

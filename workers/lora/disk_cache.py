"""A worker's on-disk cache of LoRA files, fetched from storage by sha256 and verified before use.

Layout of ``folder`` (one cache may be shared by every worker process of a machine)::

    <sha256>.safetensors      verified LoRAs (the only files ever returned)
    .locks/<sha256>.lock      per-LoRA flock: one download per file across threads and processes
    .locks/cache.lock         flock held while the cache is measured and files are evicted
    .<sha256>.safetensors.<random>.tmp    a download in flight (ignored, removed if it fails)

Rules:

* A file is only ever renamed into place after its sha256 matched, with a temp file + ``fsync`` +
  ``os.replace``, so a reader never sees a partial or unverified file. A download whose hash does
  not match (truncated, altered) is deleted and :class:`LoraError` says so.
* Two requests for the same sha (threads or processes) download it once: the second waits on the
  first's ``flock`` and then finds the file there.
* Every use stamps the file's mtime/atime (a strictly increasing clock per process), and the cache
  evicts least-recently-used files first: before a download, until the new file fits under
  ``max_bytes`` and the disk keeps ``min_free_bytes`` free after it. The file being returned and
  files whose per-sha lock is held (being downloaded) are never evicted. If the floor cannot be
  kept, :class:`LoraError` says how much space is missing.
* A file already on disk is trusted (it was verified when it was written); it is not re-hashed on
  every job.

No torch here: the cache is plain file handling and imports in milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from farm.errors import LoraError
from farm.storage import MissingObject, atomic_write

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Suffix of cached LoRA files.
SUFFIX = ".safetensors"



@dataclass(frozen=True)
class _Entry:
    sha256: str
    path: Path
    size: int
    used_ns: int


class LoraDiskCache:
    """LoRA files from ``storage`` cached in ``folder``, at most ``max_bytes`` in all, keeping
    ``min_free_bytes`` free on the disk. Thread- and process-safe (``flock``)."""

    def __init__(self, storage, folder: Path, *, max_bytes: int, min_free_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes}: the LoRA cache needs room for at least one file")
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes={min_free_bytes}: must be 0 or more")
        self.storage = storage
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.min_free_bytes = int(min_free_bytes)
        self._locks = self.folder / ".locks"
        self._locks.mkdir(parents=True, exist_ok=True)
        self._clock_lock = threading.Lock()
        self._last_ns = 0

    def __repr__(self) -> str:
        return f"LoraDiskCache({str(self.folder)!r}, max_bytes={self.max_bytes}, min_free_bytes={self.min_free_bytes})"

    # -- public ---------------------------------------------------------------------------------

    def file(self, sha256: str) -> Path:
        """Where the LoRA with this sha256 lives in the cache (whether or not it is there)."""
        return self.folder / f"{_check_sha(sha256)}{SUFFIX}"

    def path(self, sha256: str, key: str) -> tuple[Path, str]:
        """The local, verified file of LoRA ``sha256`` and how it was served: ``"disk"`` or ``"download"``.

        ``key`` is its storage key (``farm.storage.keys.content_key("loras", sha256, "safetensors")``).
        Raises :class:`LoraError` when it is not in storage, its download does not match
        ``sha256`` (nothing is left on disk), or there is no room for it; storage failures other
        than a missing object propagate as :class:`farm.errors.StorageError`.
        """
        target = self.file(sha256)
        if self._touch(target):  # the common case: no lock, no storage call
            return target, "disk"
        with _flock(self._locks / f"{sha256}.lock"):
            if self._touch(target):  # another thread/process fetched it while we waited
                return target, "disk"
            data = self._download(sha256, key)
            self._make_room(len(data), keep=sha256)
            self._write(target, data)
            self._touch(target)
            log.info("LoRA %s downloaded (%d bytes) into %s", sha256[:12], len(data), self.folder)
            return target, "download"

    def entries(self) -> list[tuple[str, int]]:
        """``(sha256, size)`` of the cached files, least recently used first."""
        return [(e.sha256, e.size) for e in self._scan()]

    def total_bytes(self) -> int:
        """Bytes held by cached LoRA files (temp files of downloads in flight not counted)."""
        return sum(e.size for e in self._scan())

    # -- internals ------------------------------------------------------------------------------

    def _now_ns(self) -> int:
        """A wall-clock stamp strictly later than the previous one from this cache object.

        File timestamps can be as coarse as a kernel tick (~4 ms): two uses in a row must still
        order correctly for LRU.
        """
        with self._clock_lock:
            self._last_ns = max(time.time_ns(), self._last_ns + 1_000)
            return self._last_ns

    def _touch(self, path: Path) -> bool:
        """Mark ``path`` as just used; False when it is not there."""
        stamp = self._now_ns()
        try:
            os.utime(path, ns=(stamp, stamp))
        except FileNotFoundError:
            return False
        except PermissionError:  # another user's file in a shared cache: usable, just not re-stamped
            return path.is_file()
        return True

    def _download(self, sha256: str, key: str) -> bytes:
        try:
            data = self.storage.get(key)
        except MissingObject as error:
            raise LoraError(
                f"LoRA {sha256} is not in storage at {key!r}: register (upload) it before using it"
            ) from error
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise LoraError(
                f"LoRA download {key!r} is corrupt: {len(data)} bytes with sha256 {actual}, expected "
                f"{sha256} (truncated or altered); the bad copy was deleted, nothing was cached. "
                "Re-upload the file if storage holds a damaged copy"
            )
        return data

    def _write(self, target: Path, data: bytes) -> None:
        try:
            atomic_write(target, data)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LoraError(f"no space left to cache LoRA {target.stem} in {self.folder}: {error}") from error
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _scan(self) -> list[_Entry]:
        entries = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            sha = path.name[: -len(SUFFIX)]
            if not _SHA256.fullmatch(sha):
                continue  # not ours (temp files start with '.', so glob skips them)
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append(_Entry(sha, path, stat.st_size, stat.st_mtime_ns))
        entries.sort(key=lambda e: (e.used_ns, e.sha256))
        return entries

    def _make_room(self, incoming: int, *, keep: str) -> None:
        """Evict LRU files until ``incoming`` more bytes fit under both limits, or raise LoraError."""
        if incoming > self.max_bytes:
            raise LoraError(
                f"LoRA {keep} is {incoming} bytes, larger than the whole LoRA cache "
                f"(max_bytes={self.max_bytes}); raise the worker's LoRA cache size"
            )
        with _flock(self._locks / "cache.lock"):
            entries = [e for e in self._scan() if e.sha256 != keep]
            total = sum(e.size for e in entries)
            free = shutil.disk_usage(self.folder).free
            while total + incoming > self.max_bytes or free - incoming < self.min_free_bytes:
                victim = self._evict_one(entries)
                if victim is None:
                    if total + incoming > self.max_bytes:  # every other file is busy downloading
                        raise LoraError(
                            f"no room for LoRA {keep} ({incoming} bytes) in the LoRA cache: "
                            f"{total} of {self.max_bytes} bytes are files in use; retry later"
                        )
                    raise LoraError(
                        f"not enough disk space for LoRA {keep} ({incoming} bytes) in {self.folder}: "
                        f"{free} bytes free, the worker keeps at least {self.min_free_bytes} free and "
                        "nothing is left to evict; free disk space or lower the free-space floor"
                    )
                total -= victim.size
                free = shutil.disk_usage(self.folder).free

    def _evict_one(self, entries: list[_Entry]) -> _Entry | None:
        """Delete the least recently used evictable entry (removing it from ``entries``)."""
        for i, entry in enumerate(entries):
            lock_path = self._locks / f"{entry.sha256}.lock"
            with _flock(lock_path, blocking=False) as held:
                if not held:
                    continue  # being downloaded right now
                with contextlib.suppress(FileNotFoundError):
                    entry.path.unlink()
                log.info("LoRA %s evicted from %s (%d bytes)", entry.sha256[:12], self.folder, entry.size)
            del entries[i]
            return entry
        return None


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or _SHA256.fullmatch(sha256) is None:
        raise ValueError(f"sha256={sha256!r}: must be 64 lowercase hex digits (hashlib.sha256(data).hexdigest())")
    return sha256


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False when ``blocking=False`` and it is taken.

    Each call opens the file anew, so threads of one process exclude each other as processes do.
    """
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

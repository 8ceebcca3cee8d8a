"""Encode and upload images on a small thread pool, off the render's critical path.

``Uploader(storage, workers=4)``: :meth:`Uploader.submit` queues one object (its bytes, or a callable
that makes them, e.g. the PNG encode) and returns a :class:`~concurrent.futures.Future` that
resolves to the key once the object is stored; :meth:`Uploader.drain` waits for everything
submitted so far and raises the first error (in submit order) after all of them finished.
With ``retries=N`` a put that raises :class:`~farm.errors.StorageError` is tried again up to N times,
``backoff(attempt)`` seconds apart, with the bytes already made (a PNG is encoded once).

Threads fit: PNG compression (zlib) and socket I/O release the GIL, and the storage backends are
thread-safe (one boto3 client per :class:`farm.storage.s3.S3Storage`; :class:`farm.storage.FileStorage`
writes each object through its own temp file).

The task records an image only after its future resolved (upload before record: a record never
points nowhere) and leaves the ``with`` block only when every upload it started has finished or was
canceled, so nothing of a task is still uploading after it returned or asked for a retry.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Mapping

from farm.errors import StorageError

#: ``on_done(key, error)``: called once per submitted item, in a pool thread, ``error`` None on success.
DoneCallback = Callable[[str, "BaseException | None"], None]


class Uploader:
    """A bounded pool of upload threads over one storage backend (anything with ``put``)."""

    def __init__(
        self,
        storage: Any,
        workers: int = 4,
        *,
        retries: int = 0,
        backoff: Callable[[int], float] = lambda attempt: min(30.0, 2.0**attempt),
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if retries < 0:
            raise ValueError(f"retries must be at least 0, got {retries}")
        self.storage = storage
        self.workers = workers
        self.retries = retries
        self.backoff = backoff
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="farm-upload")
        self._lock = threading.Lock()
        self._pending: list[Future] = []
        #: Seconds spent making bytes (e.g. PNG encode) and storing them, summed over items.
        self.encode_seconds = 0.0
        self.upload_seconds = 0.0
        self.uploaded = 0
        #: Puts that failed and were tried again.
        self.retried = 0

    def __enter__(self) -> "Uploader":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error, uploads not started yet are dropped; those in flight finish before we return.
        self.close(cancel=exc_type is not None)

    def submit(
        self,
        key: str,
        data: bytes | Callable[[], bytes],
        content_type: str,
        metadata: Mapping[str, str] | None = None,
        on_done: DoneCallback | None = None,
    ) -> Future:
        """Queue ``data`` (bytes, or a callable run in the pool that returns them) for ``key``.

        The future's result is ``key``; its exception is whatever making or storing the bytes raised
        (``StorageError`` from the backends). ``on_done`` runs once, after the attempt, either way.
        """
        future = self._pool.submit(self._one, key, data, content_type, dict(metadata or {}), on_done)
        with self._lock:
            self._pending.append(future)
        return future

    def _one(self, key, data, content_type, metadata, on_done) -> str:
        error: BaseException | None = None
        try:
            started = time.perf_counter()
            body = data() if callable(data) else data
            encoded = time.perf_counter()
            self._put(key, body, content_type, metadata)
            stored = time.perf_counter()
            with self._lock:
                self.encode_seconds += encoded - started
                self.upload_seconds += stored - encoded
                self.uploaded += 1
        except BaseException as exc:  # handed to the caller through the future
            error = exc
        if on_done is not None:
            on_done(key, error)  # an error here fails this item's future too
        if error is not None:
            raise error
        return key

    def _put(self, key, body, content_type, metadata) -> None:
        for attempt in range(self.retries + 1):
            try:
                self.storage.put(key, body, content_type=content_type, metadata=metadata)
                return
            except StorageError:
                if attempt == self.retries:
                    raise
                with self._lock:
                    self.retried += 1
                time.sleep(self.backoff(attempt))

    def drain(self) -> list[str]:
        """Wait for every item submitted so far; return their keys in submit order.

        If any failed, all the others still finish first, then the first failure (in submit order)
        is raised; the drained items are forgotten either way.
        """
        with self._lock:
            pending, self._pending = self._pending, []
        wait(pending)
        for future in pending:
            if not future.cancelled() and future.exception() is not None:
                raise future.exception()
        return [future.result() for future in pending if not future.cancelled()]

    def close(self, *, cancel: bool = False) -> None:
        """Stop the pool; with ``cancel`` drop queued items. Waits for the ones already running."""
        self._pool.shutdown(wait=True, cancel_futures=cancel)

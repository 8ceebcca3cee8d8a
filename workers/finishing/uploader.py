"""Encode and upload images on a small thread pool, off the render's critical path.

``Uploader(storage, workers=4)``: :meth:`Uploader.submit` queues one object (its bytes, or a callable
that makes them, e.g. the PNG encode) and returns a :class:`~concurrent.futures.Future` that
resolves to the key once the object is stored; :meth:`Uploader.drain` waits for everything
submitted so far and raises the first error (in submit order) after all of them finished.
With ``retries=N`` a put that raises :class:`~farm.errors.StorageError` is tried again up to N times,
``backoff(attempt)`` seconds apart, with the bytes already made (a PNG is encoded once).
With ``put_timeout=S`` one object's put, retries included, ends within about S seconds: no retry
starts after it, and the storage backend starts no attempt it could not finish by then
(:func:`farm.storage.base.time_limit`; S3 attempts are bounded by their connect/read timeouts).

:meth:`Uploader.make` and :meth:`Uploader.store` are the two halves of an item (make the bytes; put
them with retries, within ``put_timeout``), for callers that decide between them (the
:class:`~workers.finishing.finisher.Finisher` spools bytes that storage cannot take now);
:meth:`Uploader.run` runs such a job on the pool.

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
from farm.storage.base import time_limit

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
        put_timeout: float | None = None,
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if retries < 0:
            raise ValueError(f"retries must be at least 0, got {retries}")
        if put_timeout is not None and put_timeout <= 0:
            raise ValueError(f"put_timeout must be positive, got {put_timeout}")
        self.storage = storage
        self.workers = workers
        self.retries = retries
        self.backoff = backoff
        #: Seconds one object's put may take, retries included (None: no limit).
        self.put_timeout = put_timeout
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

    def run(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the pool (a job that calls :meth:`make` and :meth:`store` itself).

        Not tracked by :meth:`drain`: the caller keeps its own account. :meth:`close` waits for it."""
        return self._pool.submit(fn, *args)

    def make(self, data: bytes | Callable[[], bytes]) -> bytes:
        """The bytes of ``data`` (calling it if it is a callable), timed into ``encode_seconds``."""
        started = time.perf_counter()
        body = data() if callable(data) else data
        with self._lock:
            self.encode_seconds += time.perf_counter() - started
        return body

    def store(self, key: str, body: bytes, content_type: str, metadata: Mapping[str, str] | None = None) -> None:
        """Put ``body`` at ``key``, tried ``retries`` more times on StorageError, within ``put_timeout``.

        Safe from any thread. Raises the last error (a :class:`~farm.storage.base.StorageUnavailable`
        when storage did not answer)."""
        started = time.perf_counter()
        with time_limit(self.put_timeout) as deadline:
            self._put(key, body, content_type, dict(metadata or {}), deadline)
        with self._lock:
            self.upload_seconds += time.perf_counter() - started
            self.uploaded += 1

    def _one(self, key, data, content_type, metadata, on_done) -> str:
        error: BaseException | None = None
        try:
            body = self.make(data)
            self.store(key, body, content_type, metadata)
        except BaseException as exc:  # handed to the caller through the future
            error = exc
        if on_done is not None:
            on_done(key, error)  # an error here fails this item's future too
        if error is not None:
            raise error
        return key

    def _put(self, key, body, content_type, metadata, deadline: float | None) -> None:
        for attempt in range(self.retries + 1):
            try:
                self.storage.put(key, body, content_type=content_type, metadata=metadata)
                return
            except StorageError:
                pause = self.backoff(attempt)
                if attempt == self.retries or (deadline is not None and time.monotonic() + pause >= deadline):
                    raise
                with self._lock:
                    self.retried += 1
                time.sleep(pause)

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

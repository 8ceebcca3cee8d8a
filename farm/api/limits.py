"""Per-key request rate (token bucket) and the waiter that resolves synchronous requests."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

from starlette.concurrency import run_in_threadpool

__all__ = ["RateLimiter", "Waiter"]

log = logging.getLogger("farm.api")


class BackgroundLoop:
    """A coroutine (``_run``) the API process runs beside its requests, started and stopped with the
    app (its lifespan): the waiter of synchronous requests, the webhook sender."""

    _task: "asyncio.Task | None" = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:  # pragma: no cover - each loop has its own
        raise NotImplementedError


class RateLimiter:
    """One token bucket per key, in this process: ``rate`` tokens a second, burst ``max(1, rate)``."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str, rate: float) -> float:
        """0 when a request may go now (a token is taken), else the seconds until one may."""
        burst = max(1.0, rate)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / rate


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class Waiter(BackgroundLoop):
    """Synchronous requests wait here for their jobs: one background loop polls the database for all
    of them at once (one query per ``interval``), so hundreds of waiting requests hold no thread."""

    def __init__(self, farm, interval: float):
        self._farm = farm
        self._interval = interval
        self._waiting: dict[str, list[asyncio.Future]] = {}
        self._task = None

    async def wait(self, submission_id: str, timeout: float) -> bool:
        """True when every image of ``submission_id`` finished within ``timeout`` seconds."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(submission_id, []).append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            futures = self._waiting.get(submission_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._waiting.pop(submission_id, None)

    async def _run(self) -> None:
        from farm.api.jobs import finished

        while True:
            await asyncio.sleep(self._interval)
            ids = list(self._waiting)
            if not ids:
                continue
            try:
                done = set()
                for start in range(0, len(ids), 500):
                    done |= await run_in_threadpool(finished, self._farm, ids[start : start + 500])
            except Exception as exc:  # noqa: BLE001 - the database away: keep waiting, say so
                log.warning("polling finished jobs failed: %s", exc)
                continue
            for submission_id in done:
                for future in self._waiting.get(submission_id, []):
                    if not future.done():
                        future.set_result(True)

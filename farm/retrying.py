"""Infrastructure errors are retried until a deadline, never counted against an image.

A database restarting, a broker failing over, a network blip: the work is fine, the road to it is
not. :func:`until_deadline` runs one step again with capped, jittered exponential backoff (full
jitter, as in AWS's "Exponential Backoff and Jitter") until it succeeds or ``deadline_seconds`` have
passed, then raises the last error. Only errors of the infrastructure (:func:`is_infrastructure`)
are retried; anything else is raised at once.

(A small loop of our own: tenacity would do, but it is not among the farm's chosen libraries.)
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

__all__ = ["is_infrastructure", "until_deadline", "backoff"]

log = logging.getLogger("farm.retrying")

T = TypeVar("T")

#: Longest wait between two tries, in seconds.
CAP_SECONDS = 30.0


def is_infrastructure(exc: BaseException) -> bool:
    """True for a database, broker or network error that says nothing about the work itself."""
    from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError as PoolTimeout

    if isinstance(exc, (OperationalError, PoolTimeout)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        from kombu.exceptions import OperationalError as KombuOperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeout
    except ImportError:  # pragma: no cover - both ship with celery[redis]
        return False
    return isinstance(exc, (KombuOperationalError, RedisConnectionError, RedisTimeout))


def backoff(attempt: int, *, base: float = 0.5, cap: float = CAP_SECONDS) -> float:
    """Seconds to wait before try ``attempt + 1`` (full jitter over a capped exponential)."""
    return random.uniform(0, min(cap, base * 2**attempt))


def until_deadline(
    step: Callable[[], T],
    *,
    deadline_seconds: float,
    what: str,
    sleep: Callable[[float], object] = time.sleep,
    should_stop: Callable[[], bool] = lambda: False,
) -> T:
    """``step()``, tried again on infrastructure errors until ``deadline_seconds`` have passed (or
    ``should_stop()`` says so); the outage is logged once when it starts and once when it ends."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            result = step()
        except Exception as exc:
            if not is_infrastructure(exc):
                raise
            waited = time.monotonic() - started
            if waited >= deadline_seconds or should_stop():
                log.warning("%s: gave up after %.0f s: %s", what, waited, type(exc).__name__)
                raise
            if attempt == 0:
                log.warning("%s: %s; retrying for up to %.0f s", what, type(exc).__name__, deadline_seconds)
            sleep(min(backoff(attempt), max(0.0, deadline_seconds - waited)))
            attempt += 1
            continue
        if attempt:
            log.warning("%s: succeeded after %d retries (%.0f s)", what, attempt, time.monotonic() - started)
        return result

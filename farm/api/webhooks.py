"""Webhooks: when a job with a ``callback_url`` finishes, POST its status to that URL.

Runs as a background task of the API process (never in a worker): every ``webhook_interval`` it
looks for jobs whose webhook is due, checks they finished, claims each (a conditional UPDATE, so
several API processes share the work) and POSTs, in a thread, with these headers:

* ``X-Farm-Timestamp``: unix seconds;
* ``X-Farm-Signature``: ``sha256=`` + hex HMAC-SHA256, keyed with the key's webhook secret, over
  ``timestamp + "." + body`` (the raw body bytes);
* ``X-Farm-Idempotency-Key``: the job id + ``:finished`` — the same on every retry; a receiver
  that saw it already should answer 2xx and do nothing;
* ``X-Farm-Attempt``: 1, 2, …

Any 2xx ends it; anything else (or no answer) is retried with doubling backoff
(``FARM_API_WEBHOOK_BACKOFF``, capped at 300 s) up to ``FARM_API_WEBHOOK_ATTEMPTS``, then marked
failed. Delivery is at least once: a process killed between a receiver's 2xx and the record
sends it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from datetime import timedelta

from sqlalchemy import or_, select, update

from farm.api.limits import BackgroundLoop
from starlette.concurrency import run_in_threadpool

from farm.db.tables import ApiJobRecord, ApiKeyRecord, utcnow

__all__ = ["WebhookSender", "sign", "verify"]

log = logging.getLogger("farm.api.webhooks")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance: float = 300.0) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    try:
        fresh = abs(time.time() - int(timestamp)) <= tolerance
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


class WebhookSender(BackgroundLoop):
    def __init__(self, farm, api_settings):
        self._farm = farm
        self._settings = api_settings
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                due = await run_in_threadpool(self._due)
                if due:
                    await asyncio.gather(*(run_in_threadpool(self.deliver, job_id) for job_id in due))
            except Exception as exc:  # noqa: BLE001 - never let the loop die (the database away…)
                log.warning("webhook round failed: %s", exc)
            await asyncio.sleep(self._settings.webhook_interval)

    def _due(self) -> list[str]:
        from farm.api.jobs import finished

        now = utcnow()
        with self._farm.sessions() as session:
            ids = list(session.scalars(
                select(ApiJobRecord.submission_id)
                .where(ApiJobRecord.webhook_state == "pending")
                .where(or_(ApiJobRecord.webhook_next_at.is_(None), ApiJobRecord.webhook_next_at <= now))
                .order_by(ApiJobRecord.created_at).limit(200)
            ))
        return sorted(finished(self._farm, ids))

    def deliver(self, job_id: str) -> bool | None:
        """One attempt for ``job_id``: True delivered, False failed (retry later), None not ours now."""
        from farm.api.jobs import job_view

        settings = self._settings
        now = utcnow()
        with self._farm.sessions.begin() as session:
            job = session.get(ApiJobRecord, job_id)
            if job is None or job.webhook_state != "pending" or (job.webhook_next_at and job.webhook_next_at > now):
                return None
            attempt = job.webhook_attempts + 1
            # claim: push its next attempt past this one's timeout (another process skips it)
            claimed = session.execute(
                update(ApiJobRecord)
                .where(ApiJobRecord.submission_id == job_id, ApiJobRecord.webhook_attempts == attempt - 1)
                .values(webhook_next_at=now + timedelta(seconds=settings.webhook_timeout * 2 + 5), webhook_attempts=attempt)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not claimed:
                return None
            secret = session.scalar(select(ApiKeyRecord.webhook_secret).where(ApiKeyRecord.id == job.key_id)) or ""
            url = job.callback_url
        with self._farm.sessions() as session:
            job = session.get(ApiJobRecord, job_id)
        body = json.dumps({"event": "job.finished", "job": job_view(self._farm, job)}, sort_keys=True).encode()
        timestamp = str(int(time.time()))
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json",
            "User-Agent": "farm-webhooks/1",
            "X-Farm-Timestamp": timestamp,
            "X-Farm-Signature": sign(secret, timestamp, body),
            "X-Farm-Idempotency-Key": f"{job_id}:finished",
            "X-Farm-Attempt": str(attempt),
        })
        error = None
        try:
            with urllib.request.urlopen(request, timeout=settings.webhook_timeout) as answer:
                if not 200 <= answer.status < 300:
                    error = f"HTTP {answer.status}"
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code}"
        except Exception as exc:  # noqa: BLE001 - refused, timed out, bad host: retried
            error = f"{type(exc).__name__}: {exc}"[:500]
        with self._farm.sessions.begin() as session:
            job = session.get(ApiJobRecord, job_id)
            if error is None:
                job.webhook_state, job.webhook_next_at, job.webhook_error = "delivered", None, None
                return True
            job.webhook_error = error
            if attempt >= settings.webhook_attempts:
                job.webhook_state, job.webhook_next_at = "failed", None
                log.warning("webhook of job %s failed for good after %d attempts: %s", job_id, attempt, error)
            else:
                delay = min(300.0, settings.webhook_backoff * 2 ** (attempt - 1))
                job.webhook_next_at = utcnow() + timedelta(seconds=delay)
            return False

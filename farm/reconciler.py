"""The reconciler: the farm heals itself, with no person and no id.

The database is the truth about every image; the broker only carries messages, and messages get lost
(Redis restarted empty, a submitter killed between its commit and its publish, a publish refused, a
claim that gave up during a long database outage). Each round, the reconciler makes the broker agree
with the database again:

1. **Expired leases**: images whose worker stopped renewing its claim (it died with its message)
   are queued again and published (``farm.lifecycle.take_back_expired``).
2. **The outbox**: what was recorded and never published — a new submission without
   ``published_at``, an image queued again whose ``publish_after`` is still set — is published once
   it is older than ``reconcile_grace_seconds`` (``farm.dispatch.publish.publish_outbox``).
3. **Lost messages**: when the broker's marker is gone (it restarted empty) and every
   ``reconcile_deep_seconds`` anyway, the task ids the broker holds are compared with the images the
   database says are queued; those whose message is nowhere are published again
   (``farm.dispatch.broker_state``).
4. **Gone workers' own queues**: LoRA jobs routed to a warm worker's own queue go back to the
   model's shared queue once that worker's advert has expired (stopped, scaled away, renamed).
5. **Training jobs** (``farm.training.recover``): the same cases for LoRA training jobs — a job
   whose worker stopped renewing its lease is queued again (it resumes from its last checkpoint),
   one still marked in the outbox is published, and after a deep round (step 3) every queued job is
   published again.

Publishing twice is harmless (``farm.lifecycle`` claims each image once), so every step errs on the
side of sending. It runs inside every ``farm worker`` supervisor and as ``farm reconcile``; however
many run, one leads at a time (a lease row in the database, renewed each round), and a round that
hits an outage just tries again next round — it never gives up.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError

from farm import lifecycle, training
from farm.db.tables import ImageRecord, LeaseRecord, Status, SubmissionRecord, utcnow
from farm.dispatch.broker_state import BrokerState
from farm.dispatch.publish import publish_images, publish_outbox
from farm.services import Services

__all__ = ["Reconciler", "Round"]

log = logging.getLogger("farm.reconciler")

#: The lease row's name: one leader per farm (its queue prefix) in a database.
LEASE_PREFIX = "reconciler:"


@dataclass
class Round:
    """What one round did (counts of images)."""

    leader: bool = False
    taken_back: int = 0  # expired leases queued again
    published: int = 0  # outbox: recorded, never published
    republished: int = 0  # queued, but their message was nowhere in the broker
    returned: int = 0  # messages moved from a gone worker's own queue to the shared one
    training: int = 0  # training jobs published: lease expired, outbox, or lost with the broker
    deep: bool = False  # the broker's queues were compared with the database
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return self.taken_back + self.published + self.republished + self.returned + self.training

    def __str__(self) -> str:
        if not self.leader:
            return "another reconciler leads; nothing done"
        text = (
            f"expired leases queued again: {self.taken_back}; published from the outbox: {self.published}; "
            f"republished (message lost): {self.republished}; moved from gone workers' queues: {self.returned}; "
            f"training jobs published: {self.training}"
            + ("" if self.deep else " (broker not compared this round)")
        )
        return text + "".join(f"\nerror: {e}" for e in self.errors)


class Reconciler:
    def __init__(self, services: Services, *, holder: str | None = None):
        self.services = services
        self.settings = services.settings
        self.holder = holder or f"{socket.gethostname()}/{os.getpid()}"
        self.broker = BrokerState(self.settings)
        self.lease_name = f"{LEASE_PREFIX}{self.settings.queue_prefix}"[:64]
        self._last_deep = float("-inf")
        #: When a round last failed (an outage): leases that ran out during it are given one more
        #: lease to be renewed by their live workers before they are taken back.
        self._last_failure = float("-inf")

    # -- one round ------------------------------------------------------------------------------
    def run_once(self, *, deep: bool | None = None) -> Round:
        """One round (see the module docstring); ``deep`` forces (True) or skips (False) step 3.
        Errors of a step are logged and reported; the other steps still run."""
        result = Round()
        if not self._lead():
            return result
        result.leader = True
        services, settings = self.services, self.settings
        recovering = time.monotonic() - self._last_failure < settings.claim_lease_seconds
        try:
            taken = lifecycle.take_back_expired(
                services.sessions, grace_seconds=settings.claim_lease_seconds if recovering else 0.0
            )
            result.taken_back = len(taken)
            if taken:  # if this publish fails, the images stay marked: the outbox step sends them later
                publish_images(services.sessions, services.celery, settings, taken, origin="(lease expired)")
        except Exception as exc:  # noqa: BLE001 - an outage: next round
            result.errors.append(f"expired leases: {_describe(exc)}")
        try:
            result.published = publish_outbox(
                services.sessions, services.celery, settings, older_than=settings.reconcile_grace_seconds
            )
        except Exception as exc:  # noqa: BLE001
            result.errors.append(f"outbox: {_describe(exc)}")
        try:  # messages routed to a warm worker that is gone go back to the shared queue
            result.returned = self.broker.return_orphaned()
        except Exception as exc:  # noqa: BLE001
            result.errors.append(f"orphaned queues: {_describe(exc)}")
        try:
            lost = self.broker.lost_state()
            due = time.monotonic() - self._last_deep >= settings.reconcile_deep_seconds
            if deep or (deep is None and (lost or due)):
                result.deep = True
                result.republished = self._republish_lost()
                self._last_deep = time.monotonic()
        except Exception as exc:  # noqa: BLE001
            result.errors.append(f"broker check: {_describe(exc)}")
        try:  # training jobs: the same three cases (lease expired, outbox, lost with the broker)
            result.training = len(training.recover(
                services, grace_seconds=settings.claim_lease_seconds if recovering else 0.0,
                older_than=settings.reconcile_grace_seconds, lost_messages=result.deep,
            ))
        except Exception as exc:  # noqa: BLE001
            result.errors.append(f"training jobs: {_describe(exc)}")
        if result.errors:
            self._last_failure = time.monotonic()
        return result

    def _republish_lost(self) -> int:
        """Publish again the queued images whose task message the broker does not hold."""
        services, settings = self.services, self.settings
        cutoff = utcnow() - timedelta(seconds=settings.reconcile_grace_seconds)
        queued_published = and_(
            ImageRecord.status == Status.queued.value,
            ImageRecord.publish_after.is_(None),  # marked ones are the outbox's
            ImageRecord.submission_id.in_(
                select(SubmissionRecord.id).where(SubmissionRecord.published_at < cutoff)
            ),
        )
        with services.sessions() as session:
            candidates = session.execute(select(ImageRecord.id, ImageRecord.task_id).where(queued_published)).all()
        if not candidates:
            return 0
        present = self.broker.task_ids()  # listed after the database: a message consumed meanwhile
        if present is None:  # shows up as an image no longer queued, filtered below
            return 0
        missing = [image_id for image_id, task_id in candidates if task_id not in present]
        if not missing:
            return 0
        with services.sessions() as session:  # still queued now (not claimed while we listed)
            still = []
            for start in range(0, len(missing), 10_000):
                still += session.scalars(
                    select(ImageRecord.id).where(
                        ImageRecord.id.in_(missing[start : start + 10_000]), ImageRecord.status == Status.queued.value
                    )
                ).all()
        if still:
            publish_images(services.sessions, services.celery, settings, still, origin="(message lost)")
        return len(still)

    # -- leading ----------------------------------------------------------------------------------
    def _lead(self) -> bool:
        """Take or renew the leader lease; False while another live reconciler holds it."""
        now = utcnow()
        until = now + timedelta(seconds=3 * self.settings.reconcile_interval + 5)
        sessions = self.services.sessions
        try:
            with sessions.begin() as session:
                renewed = session.execute(
                    update(LeaseRecord)
                    .where(
                        LeaseRecord.name == self.lease_name,
                        or_(LeaseRecord.holder == self.holder, LeaseRecord.expires_at < now),
                    )
                    .values(holder=self.holder, expires_at=until)
                ).rowcount
                if renewed:
                    return True
                if session.get(LeaseRecord, self.lease_name) is not None:
                    return False
                session.add(LeaseRecord(name=self.lease_name, holder=self.holder, expires_at=until))
            return True
        except IntegrityError:  # another one inserted it first
            return False

    def step_down(self) -> None:
        """Give the lease up (at shutdown) so another reconciler leads at once."""
        try:
            with self.services.sessions.begin() as session:
                session.execute(
                    update(LeaseRecord)
                    .where(LeaseRecord.name == self.lease_name, LeaseRecord.holder == self.holder)
                    .values(expires_at=utcnow())
                )
        except Exception:  # noqa: BLE001 - the lease runs out by itself
            pass
        self.broker.close()

    # -- forever ----------------------------------------------------------------------------------
    def run(self, stopping: threading.Event) -> None:
        """Rounds every ``reconcile_interval`` seconds until ``stopping`` is set; outages are logged
        once when they start and once when they end, never fatal."""
        failing = False
        while True:
            try:
                result = self.run_once()
                if result.changed:
                    log.warning("reconciler: %s", result)
                if result.errors and not failing:
                    log.warning("reconciler: %s (retrying every %.0f s)", "; ".join(result.errors), self.settings.reconcile_interval)
                elif failing and not result.errors:
                    log.warning("reconciler: database and broker answer again")
                failing = bool(result.errors)
            except Exception as exc:  # noqa: BLE001 - e.g. the database away while taking the lease
                self._last_failure = time.monotonic()
                if not failing:
                    log.warning("reconciler: %s (retrying every %.0f s)", _describe(exc), self.settings.reconcile_interval)
                failing = True
            if stopping.wait(self.settings.reconcile_interval):
                break
        self.step_down()


def _describe(exc: BaseException) -> str:
    """One line for the log: the error's type and first line, any URL password hidden."""
    from farm.settings import redact

    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact(f"{type(exc).__name__}: {text}")[:300]

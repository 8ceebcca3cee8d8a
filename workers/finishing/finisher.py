"""Finish rendered images off the GPU's critical path: PNG encode, upload and record, across tasks.

A render task hands each rendered chunk to its process's :class:`Finisher` and goes on: the next
chunk, or the next task, renders while these encode and upload on the
:class:`~workers.finishing.uploader.Uploader`'s threads, so the GPU does not wait for the network. Each image
is recorded (``record``) only after its own upload finished: a record never points nowhere.

Nothing is lost by a task returning (and being acked) before its uploads finished: its images stay
claimed (status ``running``) until recorded, and the finisher renews their leases (``renew``) while
they wait. If the process dies with uploads pending, the leases run out and the lease sweeper queues
those images again: rendered again, never lost.

Backpressure: at most ``max_pending`` hand-offs are in flight; :meth:`Finisher.hand_off` blocks past
that (their leases still renewed), so a slow store slows the GPU down instead of filling memory.

A hand-off whose uploads still fail after the uploader's retries gives its unrecorded images back
through its ``give_back(image_ids, error)`` (the render task releases them and publishes them again).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

log = logging.getLogger("farm.worker.finisher")

#: ``record(token, image_id, key, values)``: store the image's result; False if its claim was lost.
Record = Callable[[str, str, str, Mapping[str, Any]], bool]
#: ``renew(tokens)``: extend the leases of these claims.
Renew = Callable[[Sequence[str]], None]
#: ``give_back(image_ids, error)``: these images could not be finished; queue them again.
GiveBack = Callable[[list[str], BaseException], None]


@dataclass
class Item:
    """One rendered image to finish: ``make()`` returns its bytes (the PNG encode, run in the pool)."""

    image_id: str
    key: str
    make: Callable[[], bytes]
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: Recorded with the image once it is stored (gpu_seconds, prompt_tokens…).
    values: Mapping[str, Any] = field(default_factory=dict)
    content_type: str = "image/png"


class HandOff:
    """The images of one chunk on their way to storage and the database."""

    def __init__(self, token: str, items: Sequence[Item], give_back: GiveBack | None):
        self.token = token
        self.items = list(items)
        self.give_back = give_back
        self.recorded: list[str] = []
        #: Uploaded, but the claim was gone when recording (canceled, or taken over).
        self.lost: list[str] = []
        self.failed: list[str] = []
        self.error: BaseException | None = None
        self._remaining = len(self.items)
        self._lock = threading.Lock()
        self._done = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class Finisher:
    """Encodes, uploads and records hand-offs on an uploader's threads, renewing their leases."""

    def __init__(
        self,
        uploader: Any,
        *,
        record: Record,
        renew: Renew,
        renew_every: float,
        max_pending: int = 2,
    ):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.uploader = uploader
        self.record = record
        self.renew = renew
        self.renew_every = renew_every
        self.max_pending = max_pending
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._pending: list[HandOff] = []
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- the task's side ---------------------------------------------------------------------------

    def hand_off(self, token: str, items: Iterable[Item], give_back: GiveBack | None = None) -> HandOff:
        """Queue ``items`` (all of claim ``token``); returns at once unless ``max_pending`` are in flight."""
        handoff = HandOff(token, list(items), give_back)
        with self._lock:
            self._pending.append(handoff)  # renewed from now on, also while waiting for a slot
        self._start_renewer()
        self._slots.acquire()
        if not handoff.items:
            self._finish(handoff)
            return handoff
        for item in handoff.items:
            self.uploader.submit(
                item.key,
                item.make,
                item.content_type,
                item.metadata,
                on_done=lambda key, error, item=item: self._uploaded(handoff, item, error),
            )
        return handoff

    def wait(self, handoffs: Iterable[HandOff] | None = None, timeout: float | None = None) -> bool:
        """Wait for ``handoffs`` (default: all in flight); False if ``timeout`` ran out first."""
        if handoffs is None:
            with self._lock:
                handoffs = list(self._pending)
        return all(handoff.wait(timeout) for handoff in handoffs)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self, timeout: float | None = None) -> bool:
        """Finish what was handed off (up to ``timeout``), then stop the threads."""
        finished = self.wait(timeout=timeout)
        self._stop.set()
        self.uploader.close(cancel=not finished)
        if not finished:
            log.warning("closing with %d hand-off(s) unfinished: their leases will run out and they will be rendered again", self.pending)
        return finished

    # -- the pool's side ---------------------------------------------------------------------------

    def _uploaded(self, handoff: HandOff, item: Item, error: BaseException | None) -> None:
        recorded = False
        if error is None:
            try:
                recorded = self.record(handoff.token, item.image_id, item.key, item.values)
            except Exception as exc:  # the database is down: like a failed upload, give it back
                error = exc
        with handoff._lock:
            if error is not None:
                handoff.failed.append(item.image_id)
                handoff.error = handoff.error or error
            elif recorded:
                handoff.recorded.append(item.image_id)
            else:
                handoff.lost.append(item.image_id)
            handoff._remaining -= 1
            last = handoff._remaining == 0
        if error is not None:
            log.warning("image %s not finished: %s: %s", item.image_id, type(error).__name__, error)
        if last:
            self._finish(handoff)

    def _finish(self, handoff: HandOff) -> None:
        try:
            if handoff.failed and handoff.give_back is not None:
                handoff.give_back(list(handoff.failed), handoff.error)
        except Exception:  # the leases run out and the sweeper queues them again
            log.exception("could not give back %d image(s) of claim %s", len(handoff.failed), handoff.token)
        finally:
            with self._lock:
                self._pending.remove(handoff)
            self._slots.release()
            handoff._done.set()

    def _start_renewer(self) -> None:
        with self._lock:
            if self._renewer is not None:
                return
            self._renewer = threading.Thread(target=self._renew_loop, name="farm-lease-renewer", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            with self._lock:
                tokens = sorted({handoff.token for handoff in self._pending})
            if not tokens:
                continue
            try:
                self.renew(tokens)
            except Exception:  # a database hiccup: try again next round, well inside the lease
                log.warning("could not renew %d lease(s)", len(tokens), exc_info=True)

"""Finish rendered images off the GPU's critical path: PNG encode, upload and record, across tasks.

A render task hands each rendered chunk to its process's :class:`Finisher` and goes on: the next
chunk, or the next task, renders while these encode and upload on the
:class:`~workers.finishing.uploader.Uploader`'s threads, so the GPU does not wait for the network. Each image
is recorded only after its own upload finished: a record never points nowhere. With ``record_many``
(the worker's: ``lifecycle.record_success_many``) a hand-off's stored (and filtered) images are
recorded together, one database transaction per chunk, once the last of its images is uploaded or
otherwise settled (failed, spooled); without it, each image through ``record`` as soon as it is stored.

Nothing is lost by a task returning (and being acked) before its uploads finished: its images stay
claimed (status ``running``) until recorded, and the finisher renews their leases (``renew``) while
they wait. If the process dies with uploads pending, the leases run out and the lease sweeper queues
those images again: rendered again, never lost.

Backpressure: at most ``max_pending`` hand-offs are in flight; :meth:`Finisher.hand_off` blocks past
that (their leases still renewed), so a slow store slows the GPU down instead of filling memory.

Storage outages (with a :class:`~workers.finishing.spool.Spool`): one put is bounded by the
uploader's ``put_timeout`` (S3 attempts by their connect/read timeouts); when storage does not answer
(:class:`~farm.storage.base.StorageUnavailable`) the image goes to the spool, a bounded folder on
the worker's disk, and the finisher marks storage down: the next images are spooled at once, without
waiting out a timeout each. A spooled image settles its hand-off's slot (the task goes on) but its
claim stays held and renewed; one drainer thread uploads the spool, probing with one entry at a time
while storage is down (capped, jittered backoff), several at once once it answers, and records each
through ``adopt`` (or ``record``). An outage never fails an image, never counts an attempt, and
re-renders nothing unless it outlasts ``give_up_after`` (FARM_UPLOAD_DEADLINE_SECONDS): then the
spooled images of this process are given back, those of a previous one dropped (their leases run
out). When the spool is full, :meth:`Finisher.hand_off` (and :meth:`Finisher.wait_for_room`) block
until the drainer frees room: the task does not return, and the worker takes no new task. What waits
in the spool survives the process: the next finisher on the same folder uploads it first
(:meth:`Finisher.drain_spool`). A spooled file that no longer matches its hash is dropped with a
warning (its image is rendered again once its lease runs out).

Safety (with a ``screen``, :class:`~workers.finishing.safety.Screen`): each encoded PNG is checked as
its image's ``safety`` policy says before it is stored or spooled; the verdict joins the values
recorded. A flagged image under ``drop`` is not stored: it is recorded ``filtered`` (``record`` with
``key`` None and the reason as ``values["filtered"]``). An image whose check cannot run (no checker
on this worker) is failed for good through ``fail`` with the reason, never stored unchecked.

A hand-off whose uploads fail otherwise (access denied, a missing bucket, a PNG that cannot be made,
a database error while recording; or any storage error without a spool) gives its unrecorded images
back through its ``give_back(image_ids, error)`` (the render task releases them and publishes them
again).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from farm.errors import StorageError
from farm.storage.base import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, StorageUnavailable
from workers.finishing.spool import CorruptEntry, Spool, SpoolEntry, spool_folder
from workers.finishing.uploader import Uploader

log = logging.getLogger("farm.worker.finisher")

#: ``record(token, image_id, key, values)``: store the image's result; False if its claim was lost.
Record = Callable[[str, str, str, Mapping[str, Any]], bool]
#: ``record_many(token, [(image_id, key, values)…])``: store the results of many images of one claim
#: (one transaction); returns the ids recorded (the others' claim was lost).
RecordMany = Callable[[str, Sequence[tuple[str, "str | None", Mapping[str, Any]]]], Iterable[str]]
#: ``renew(tokens)``: extend the leases of these claims.
Renew = Callable[[Sequence[str]], None]
#: ``give_back(image_ids, error)``: these images could not be finished; queue them again.
GiveBack = Callable[[list[str], BaseException], None]
#: ``fail(token, image_id, error)``: record this image failed for good (its safety check cannot run).
Fail = Callable[[str, str, str], bool]

#: Final outcomes of an item (HandOff lists of the same names).
_FINAL = ("recorded", "lost", "failed", "dropped")

#: Defaults of the settings :func:`build_finisher` reads with getattr (FARM_UPLOAD_DEADLINE_SECONDS,
#: FARM_SPOOL_BYTES, FARM_SPOOL_RETRY_MAX_SECONDS), for settings that do not declare them (yet).
DEFAULT_UPLOAD_DEADLINE_SECONDS = 3600.0
DEFAULT_SPOOL_BYTES = 2 * 1024**3
DEFAULT_SPOOL_RETRY_MAX_SECONDS = 30.0
#: One put may take one S3 attempt's connect + read timeout plus this (backoff, a quick retry).
PUT_TIMEOUT_MARGIN_SECONDS = 5.0


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
    """The images of one chunk on their way to storage and the database.

    ``settled``: every image is recorded, lost, failed or waiting in the spool (its slot is free);
    ``done``: every image reached its end (recorded, lost, failed, or dropped from the spool).
    """

    def __init__(self, token: str, items: Sequence[Item], give_back: GiveBack | None):
        self.token = token
        self.items = list(items)
        self.give_back = give_back
        self.recorded: list[str] = []
        #: Uploaded, but the claim was gone when recording (canceled, or taken over).
        self.lost: list[str] = []
        self.failed: list[str] = []
        #: Went through the spool (storage did not answer); each also ends in another list.
        self.spooled: list[str] = []
        #: Spooled, then found damaged on disk: rendered again after its lease runs out.
        self.dropped: list[str] = []
        self.error: BaseException | None = None
        self._state: dict[int, str] = {}  # id(item) -> "spooled" | "final"
        #: stored (or filtered), waiting to be recorded with the rest of the hand-off (``record_many``)
        self._held: list[tuple[Item, str | None, Mapping[str, Any]]] = []
        self._flushing = False
        self._unsettled = len(self.items)
        self._remaining = len(self.items)
        self._lock = threading.Lock()
        self._settled = threading.Event()
        self._done = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def settled(self) -> bool:
        return self._settled.is_set()


class Finisher:
    """Encodes, uploads and records hand-offs on an uploader's threads, renewing their leases.

    ``spool``: where images wait while storage is down (None: such images are given back, as any
    failure). ``adopt``: how a spooled image is recorded, a ``Record`` that also takes over an image
    nobody rendered again yet (``lifecycle.record_success(..., adopt=True)``); default ``record``.
    ``retry_base``/``retry_cap``: the drainer's backoff while storage is down (seconds).
    ``give_up_after``: seconds a spooled image may wait for storage (from when it was spooled, across
    restarts) before it is given back (or, from a previous process, dropped); None: no limit.
    """

    def __init__(
        self,
        uploader: Any,
        *,
        record: Record,
        renew: Renew,
        renew_every: float,
        max_pending: int = 2,
        spool: Spool | None = None,
        adopt: Record | None = None,
        retry_base: float = 0.5,
        retry_cap: float = 30.0,
        drain_threads: int | None = None,
        give_up_after: float | None = None,
    ):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.uploader = uploader
        self.record = record
        self.adopt = adopt or record
        self.renew = renew
        self.renew_every = renew_every
        self.max_pending = max_pending
        self.spool = spool
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.give_up_after = give_up_after
        self.drain_threads = drain_threads or getattr(uploader, "workers", 4)
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._pending: list[HandOff] = []
        self._stop = threading.Event()
        self._closed = False
        self._closing = False  # shutting down: what is still in memory goes to the spool
        self._renewer: threading.Thread | None = None
        self._drainer: threading.Thread | None = None
        self._drain_pool: ThreadPoolExecutor | None = None
        self._up = threading.Event()  # storage answered last time (or was never tried)
        self._up.set()
        self._wake = threading.Event()
        #: spool entry name -> the hand-off and item it came from (entries of this process)
        self._spooled: dict[str, tuple[HandOff, Item]] = {}
        #: Counts since start: images spooled, and spool entries recorded / lost / dropped.
        self.stats = {"spooled": 0, "unspooled": 0, "unspooled_lost": 0, "dropped": 0, "expired": 0, "outages": 0}

    @property
    def storage_up(self) -> bool:
        """False from a failed upload (storage did not answer) until one succeeds."""
        return self._up.is_set()

    # -- the task's side ---------------------------------------------------------------------------

    def hand_off(self, token: str, items: Iterable[Item], give_back: GiveBack | None = None) -> HandOff:
        """Queue ``items`` (all of claim ``token``); returns at once unless ``max_pending`` are in
        flight or the spool is full (then waits: the task does not return, the worker takes no new task)."""
        if self._closed:
            raise RuntimeError("the finisher is closed")
        handoff = HandOff(token, list(items), give_back)
        with self._lock:
            self._pending.append(handoff)  # renewed from now on, also while waiting for a slot
        self._start_threads()
        self._slots.acquire()
        self.wait_for_room()
        if not handoff.items:
            self._complete(handoff, settle=True, finish=True)
            return handoff
        for item in handoff.items:
            self.uploader.run(self._finish_item, handoff, item)
        return handoff

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Wait while the spool is full (storage away for a while); False if ``timeout`` ran out first.

        :meth:`hand_off` does; a task may call it before claiming work it could not store."""
        if self.spool is None or not self.spool.full:
            return True
        log.warning("spool %s is full (%d bytes): waiting for storage before taking more work", self.spool.folder, self.spool.used_bytes)
        return self.spool.wait_for_room(timeout)

    def wait(self, handoffs: Iterable[HandOff] | None = None, timeout: float | None = None) -> bool:
        """Wait for ``handoffs`` (default: all in flight) to be done; False if ``timeout`` ran out first."""
        if handoffs is None:
            with self._lock:
                handoffs = list(self._pending)
        end = None if timeout is None else time.monotonic() + timeout
        return all(handoff.wait(None if end is None else max(0.0, end - time.monotonic())) for handoff in handoffs)

    def drain_spool(self, timeout: float | None = None) -> dict[str, int]:
        """Upload and record what waits in the spool (a previous process's images first); returns
        once it is empty or after ``timeout`` (what is left goes on draining in the background;
        ``timeout=0`` only starts it, e.g. while the model loads).

        Call it when the worker starts, before it takes tasks. Returns ``{"left": n, "recorded": n,
        "lost": n, "dropped": n}`` (lost: the image was finished or taken over elsewhere)."""
        if self.spool is None:
            return {"left": 0, "recorded": 0, "lost": 0, "dropped": 0}
        before = dict(self.stats)
        if len(self.spool):
            log.info("draining spool %s: %d image(s), %d bytes", self.spool.folder, len(self.spool), self.spool.used_bytes)
            self._start_threads()
            self._wake.set()
            self.spool.wait_empty(timeout)
        left = len(self.spool)
        if left and timeout != 0:
            log.warning("spool %s: %d image(s) still wait for storage; they upload in the background", self.spool.folder, left)
        return {
            "left": left,
            "recorded": self.stats["unspooled"] - before["unspooled"],
            "lost": self.stats["unspooled_lost"] - before["unspooled_lost"],
            "dropped": self.stats["dropped"] + self.stats["expired"] - before["dropped"] - before["expired"],
        }

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self, timeout: float | None = None) -> bool:
        """Finish what was handed off (up to ``timeout``), then stop the threads.

        With a spool, what is not finished by then (at once while storage is down) goes to the spool,
        bound lifted; puts already running end within the uploader's ``put_timeout`` first. The next
        process on the same folder uploads it. True if everything was recorded."""
        self._closed = True
        storage_down = self.spool is not None and not self._up.is_set()
        finished = self.wait(timeout=0 if storage_down else timeout)
        settled = finished
        put_timeout = getattr(self.uploader, "put_timeout", None) or 60.0
        if not finished and self.spool is not None:
            self._closing = True
            self.spool.unbound()
            with self._lock:
                handoffs = list(self._pending)
            end = time.monotonic() + put_timeout + 30.0
            settled = all(h._settled.wait(max(0.0, end - time.monotonic())) for h in handoffs)
        self._stop.set()
        self._wake.set()
        if self._drainer is not None:
            self._drainer.join(timeout=put_timeout + 30.0)
        self.uploader.close(cancel=not settled)
        if self._drain_pool is not None:
            self._drain_pool.shutdown(wait=True, cancel_futures=True)
        if self.spool is not None:
            if len(self.spool):
                log.warning(
                    "closing with %d image(s) in spool %s: the next worker on this folder uploads them",
                    len(self.spool), self.spool.folder,
                )
            self.spool.close()
        if not settled:
            log.warning("closing with %d hand-off(s) unfinished: their leases will run out and they will be rendered again", self.pending)
        return finished

    # -- the pool's side ---------------------------------------------------------------------------

    def _finish_item(self, handoff: HandOff, item: Item) -> None:
        try:
            self._finish_item_unguarded(handoff, item)
        except BaseException as exc:  # never leave an item without an outcome
            log.exception("image %s: unexpected error while finishing it", item.image_id)
            self._resolve(handoff, item, "failed", exc)

    def _finish_item_unguarded(self, handoff: HandOff, item: Item) -> None:
        started = time.monotonic()
        try:
            body = self.uploader.make(item.make)
        except BaseException as exc:
            self._resolve(handoff, item, "failed", exc)
            return
        self._observe("png_encode", time.monotonic() - started)
        if self.screen is not None:
            body = self._screen(handoff, item, body)
            if body is None:  # filtered, or failed for good: already resolved
                return
        if self.spool is not None and (self._closing or not self._up.is_set()):
            self._to_spool(handoff, item, body, None)  # storage is down: no deadline to wait out
            return
        started = time.monotonic()
        try:
            self.uploader.store(item.key, body, item.content_type, item.metadata)
        except StorageUnavailable as exc:
            if self.spool is None:
                self._resolve(handoff, item, "failed", exc)
            else:
                self._storage_down(exc)
                self._to_spool(handoff, item, body, exc)
            return
        except BaseException as exc:
            self._resolve(handoff, item, "failed", exc)
            return
        self._up.set()
        self._observe("upload", time.monotonic() - started)
        self._record(handoff, item, item.key, item.values)

    def _record(self, handoff: HandOff, item: Item, key: str | None, values: Mapping[str, Any]) -> None:
        """Record a stored (or filtered) image: at once through ``record``, or with ``record_many``
        held until the hand-off's other images settled, then recorded together (:meth:`_flush`)."""
        if self.record_many is None:
            try:
                recorded = self.record(handoff.token, item.image_id, key, values)
            except Exception as exc:  # the database is down: like a failed upload, give it back
                self._resolve(handoff, item, "failed", exc)
                return
            self._resolve(handoff, item, "recorded" if recorded else "lost")
            return
        with handoff._lock:
            handoff._held.append((item, key, values))
            held = self._take_held(handoff)
        if held:
            self._flush(handoff, held)

    @staticmethod
    def _take_held(handoff: HandOff) -> list[tuple[Item, str | None, Mapping[str, Any]]]:
        """(Under ``handoff._lock``) the held images, once every other image of the hand-off has an
        outcome (or waits in the spool), for one caller only; else []."""
        if handoff._flushing or not handoff._held or len(handoff._held) + len(handoff._state) < len(handoff.items):
            return []
        handoff._flushing = True
        return list(handoff._held)

    def _flush(self, handoff: HandOff, held: list[tuple[Item, str | None, Mapping[str, Any]]]) -> None:
        """Record ``held`` (images of one hand-off) in one ``record_many`` call."""
        assert self.record_many is not None
        try:
            recorded = set(self.record_many(handoff.token, [(item.image_id, key, values) for item, key, values in held]))
        except Exception as exc:  # the database is down: like a failed upload, give them back
            for item, _key, _values in held:
                self._resolve(handoff, item, "failed", exc)
            return
        for item, _key, _values in held:
            self._resolve(handoff, item, "recorded" if item.image_id in recorded else "lost")

    #: ``observe(phase, seconds)``: timings of png_encode and upload (workers.metrics); optional.
    observe: Callable[[str, float], None] | None = None
    #: ``screen(png) -> Screened``: the safety check of each image before it is stored
    #: (:class:`workers.finishing.safety.Screen`); None: images are stored as made.
    screen: Callable[[bytes], Any] | None = None
    #: how an image whose safety check could not run is failed for good; None: given back instead
    fail: Fail | None = None
    #: how a hand-off's stored images are recorded together (one transaction per chunk); None: each
    #: image through ``record`` (the spool's images always go one by one through ``adopt``)
    record_many: RecordMany | None = None

    def _screen(self, handoff: HandOff, item: Item, body: bytes) -> bytes | None:
        """The bytes to store after the safety check (its verdict added to ``item.values``), or None
        when the image was resolved here: dropped (recorded ``filtered``) or failed for good."""
        started = time.monotonic()
        try:
            screened = self.screen(body)
        except Exception as exc:  # no checker here, or it broke: never store the image unchecked
            error = f"{type(exc).__name__}: {exc}"
            if self.fail is None:
                self._resolve(handoff, item, "failed", exc)
                return None
            try:
                failed = self.fail(handoff.token, item.image_id, error)
            except Exception as db_error:  # the database is down: give it back
                self._resolve(handoff, item, "failed", db_error)
                return None
            log.warning("image %s failed: %s", item.image_id, error)
            self._resolve(handoff, item, "recorded" if failed else "lost")
            return None
        self._observe("safety", time.monotonic() - started)
        if screened.values:
            item.values = {**item.values, **screened.values}
        if screened.filtered is None:
            return screened.body
        self._record(handoff, item, None, {**item.values, "filtered": screened.filtered})
        return None

    def _observe(self, phase: str, seconds: float) -> None:
        if self.observe is not None:
            try:
                self.observe(phase, seconds)
            except Exception:  # noqa: BLE001 - metrics never fail an image
                pass

    def _to_spool(self, handoff: HandOff, item: Item, body: bytes, cause: BaseException | None) -> None:
        assert self.spool is not None
        name = Spool.name_for(item.image_id, hashlib.sha256(body).hexdigest())
        with self._lock:
            superseded = self._spooled.get(name)
            self._spooled[name] = (handoff, item)  # before the drainer can see the entry
        if superseded is not None:  # the same image claimed again and rendered alike: the new claim's entry replaces it
            self._resolve(superseded[0], superseded[1], "lost")
        try:
            self.spool.put(
                image_id=item.image_id, key=item.key, token=handoff.token, data=body,
                content_type=item.content_type, metadata=item.metadata, values=item.values,
            )
        except Exception as exc:
            with self._lock:
                self._spooled.pop(name, None)
            log.error("image %s: storage is down and the spool cannot take it (%s: %s)", item.image_id, type(exc).__name__, exc)
            self._resolve(handoff, item, "failed", cause or exc)
            return
        with self._lock:
            self.stats["spooled"] += 1
        self._resolve(handoff, item, "spooled")
        self._start_threads()
        self._wake.set()

    def _storage_down(self, error: BaseException) -> None:
        if self._up.is_set():
            self._up.clear()
            with self._lock:
                self.stats["outages"] += 1
            log.warning("storage is not answering (%s); rendered images go to spool %s until it does",
                        error, self.spool.folder if self.spool is not None else None)

    # -- outcomes ----------------------------------------------------------------------------------

    def _resolve(self, handoff: HandOff, item: Item, outcome: str, error: BaseException | None = None) -> None:
        """Record ``item``'s outcome: "spooled" (settled, not final) or one of ``_FINAL``."""
        settle = finish = late_failure = False
        with handoff._lock:
            state = handoff._state.get(id(item))
            if state == "final" or (outcome == "spooled" and state == "spooled"):
                return
            if outcome == "spooled":
                handoff._state[id(item)] = "spooled"
                handoff.spooled.append(item.image_id)
            else:
                handoff._state[id(item)] = "final"
                getattr(handoff, outcome).append(item.image_id)
                if outcome == "failed":
                    handoff.error = handoff.error or error
                    late_failure = state == "spooled"
                handoff._remaining -= 1
                finish = handoff._remaining == 0
            if state is None:
                handoff._unsettled -= 1
                settle = handoff._unsettled == 0
            held = self._take_held(handoff)
        if held:  # this was the last image the held ones waited for: record them now
            self._flush(handoff, held)
        if outcome == "failed":
            log.warning("image %s not finished: %s: %s", item.image_id, type(error).__name__, error)
        if late_failure:  # failed after its hand-off settled (and gave back what had failed then)
            self._give_back(handoff, [item.image_id], error)
        self._complete(handoff, settle=settle, finish=finish)

    def _complete(self, handoff: HandOff, *, settle: bool, finish: bool) -> None:
        if settle and handoff.failed:
            self._give_back(handoff, list(handoff.failed), handoff.error)
        if finish:
            with self._lock:
                self._pending.remove(handoff)
            handoff._done.set()
        if settle:
            handoff._settled.set()
            self._slots.release()

    def _give_back(self, handoff: HandOff, image_ids: list[str], error: BaseException | None) -> None:
        if handoff.give_back is None:
            return
        try:
            handoff.give_back(image_ids, error or RuntimeError("not finished"))
        except Exception:  # the leases run out and the sweeper queues them again
            log.exception("could not give back %d image(s) of claim %s", len(image_ids), handoff.token)

    # -- background threads ------------------------------------------------------------------------

    def _start_threads(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            start_renewer = self._renewer is None
            if start_renewer:
                self._renewer = threading.Thread(target=self._renew_loop, name="farm-lease-renewer", daemon=True)
            start_drainer = self.spool is not None and self._drainer is None
            if start_drainer:
                self._drain_pool = ThreadPoolExecutor(max_workers=self.drain_threads, thread_name_prefix="farm-spool")
                self._drainer = threading.Thread(target=self._drain_loop, name="farm-spool-drainer", daemon=True)
        if start_renewer:
            self._renewer.start()
        if start_drainer:
            self._drainer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            with self._lock:
                tokens = {handoff.token for handoff in self._pending}
            if self.spool is not None:
                tokens |= self.spool.tokens()  # a previous process's spooled images too
            if not tokens:
                continue
            try:
                self.renew(sorted(tokens))
            except Exception:  # a database hiccup: try again next round, well inside the lease
                log.warning("could not renew %d lease(s)", len(tokens), exc_info=True)

    def _drain_loop(self) -> None:
        assert self.spool is not None and self._drain_pool is not None
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()
            entries = self.spool.entries()
            if not entries:
                self._wake.wait(1.0)
                continue
            # storage down: probe with one entry; up: several at once
            batch = entries[: self.drain_threads] if self._up.is_set() else entries[:1]
            try:
                results = list(self._drain_pool.map(self._drain_entry, batch))
            except RuntimeError:  # the pool shut down: closing
                return
            if "retry" in results:
                failures += 1
                if not self._up.is_set():
                    self._expire()
                self._stop.wait(self._retry_delay(failures))
            else:
                failures = 0

    def _expire(self) -> None:
        """Storage is still away: give up on the images that waited past ``give_up_after``."""
        if self.give_up_after is None:
            return
        assert self.spool is not None
        now = time.time()
        for entry in self.spool.entries():
            if now - entry.created <= self.give_up_after:
                break  # oldest first
            with self._lock:
                origin = self._spooled.get(entry.name)
            self.spool.remove(entry)
            error = StorageUnavailable(f"not stored within {self.give_up_after:.0f} s (FARM_UPLOAD_DEADLINE_SECONDS): storage is away")
            if origin is None:
                log.warning("dropping spooled image %s of a previous process: %s; its lease runs out and it is "
                            "rendered again", entry.image_id, error)
            self._forget(entry, origin, "failed", error)

    def _retry_delay(self, failures: int) -> float:
        """Capped exponential backoff with jitter (the upper half of the step is random)."""
        step = min(self.retry_cap, self.retry_base * 2 ** (failures - 1))
        return step / 2 + random.uniform(0, step / 2)

    def _drain_entry(self, entry: SpoolEntry) -> str:
        """Upload and record one spooled entry: "done", "dropped" or "retry" (try again later)."""
        assert self.spool is not None
        with self._lock:
            origin = self._spooled.get(entry.name)
        try:
            body = self.spool.read(entry)
        except CorruptEntry as exc:
            self._forget(entry, origin, "dropped", exc)
            return "dropped"
        except OSError as exc:
            log.warning("cannot read spooled image %s: %s", entry.image_id, exc)
            return "retry"
        try:
            self.uploader.store(entry.key, body, entry.content_type, entry.metadata)
        except StorageError as exc:  # down, or refusing us (credentials, bucket): wait, never re-render
            self._storage_down(exc)  # (so give_up_after applies to a refusal that lasts, too)
            return "retry"
        except Exception as exc:  # the entry itself is unusable (a bad key or metadata)
            log.error("dropping spooled image %s: %s: %s", entry.image_id, type(exc).__name__, exc)
            self.spool.remove(entry)
            self._forget(entry, origin, "failed", exc)
            return "dropped"
        if not self._up.is_set():
            log.warning("storage answers again; uploading the %d image(s) in spool %s", len(self.spool), self.spool.folder)
            self._up.set()
        try:
            recorded = self.adopt(entry.token, entry.image_id, entry.key, entry.values)
        except Exception as exc:  # the database is away: keep the entry, try again
            log.warning("spooled image %s stored but not recorded: %s: %s", entry.image_id, type(exc).__name__, exc)
            return "retry"
        self.spool.remove(entry)
        if not recorded:
            log.info("spooled image %s was finished or taken over elsewhere: not recorded", entry.image_id)
        self._forget(entry, origin, "recorded" if recorded else "lost", None)
        return "done"

    def _forget(self, entry: SpoolEntry, origin: tuple[HandOff, Item] | None, outcome: str, error: BaseException | None) -> None:
        with self._lock:
            self._spooled.pop(entry.name, None)
            key = {"recorded": "unspooled", "lost": "unspooled_lost", "failed": "expired"}.get(outcome, "dropped")
            self.stats[key] += 1
        if origin is not None:
            self._resolve(origin[0], origin[1], outcome, error)


def build_finisher(
    settings: Any, storage: Any, *, worker: str, record: Record, renew: Renew, adopt: Record | None = None,
    record_many: RecordMany | None = None,
) -> Finisher:
    """The worker's finisher as ``settings`` say: an :class:`Uploader` (``upload_threads``,
    ``upload_retries``; one put bounded by about one S3 attempt's timeouts), a :class:`Spool` in
    ``<data_dir>/spool/<worker>`` bounded by ``spool_bytes``, spooled images given up on after
    ``upload_deadline_seconds``, leases renewed every quarter lease, ``spool_retry_max_seconds`` at
    most between probes of a storage that is away. Opens (and locks) the spool folder: build it in
    the process that uses it (after the fork)."""
    connect = float(getattr(settings, "s3_connect_timeout", DEFAULT_CONNECT_TIMEOUT))
    read = float(getattr(settings, "s3_read_timeout", DEFAULT_READ_TIMEOUT))
    uploader = Uploader(
        storage, workers=settings.upload_threads, retries=settings.upload_retries,
        # a hung server costs one timed-out attempt before the image goes to the spool; quick
        # failures (refused, 503) get several attempts within it
        put_timeout=connect + read + PUT_TIMEOUT_MARGIN_SECONDS,
    )
    spool_bytes = int(getattr(settings, "spool_bytes", DEFAULT_SPOOL_BYTES))
    give_up = getattr(settings, "upload_deadline_seconds", DEFAULT_UPLOAD_DEADLINE_SECONDS)
    finisher = Finisher(
        uploader,
        record=record,
        adopt=adopt,
        renew=renew,
        renew_every=settings.claim_lease_seconds / 4,
        max_pending=settings.upload_max_pending,
        spool=Spool(spool_folder(settings.data_dir, worker), max_bytes=spool_bytes),
        retry_cap=float(getattr(settings, "spool_retry_max_seconds", DEFAULT_SPOOL_RETRY_MAX_SECONDS)),
        give_up_after=float(give_up) if give_up else None,
    )
    finisher.record_many = record_many
    return finisher

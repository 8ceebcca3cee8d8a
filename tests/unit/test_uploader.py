"""workers.finishing.uploader: PNG encode + upload on a thread pool (no model, no network)."""

from __future__ import annotations

import threading
import time

import pytest

from farm.errors import StorageError
from farm.storage import FileStorage
from workers.finishing.uploader import Uploader


class SlowStorage:
    """A storage whose ``put`` takes ``delay`` seconds; counts how many run at once."""

    def __init__(self, delay: float = 0.1, fail: set[str] | None = None):
        self.delay = delay
        self.fail = fail or set()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.stored: dict[str, tuple[bytes, str, dict]] = {}

    def put(self, key, data, *, content_type, metadata=None):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            if key in self.fail:
                raise StorageError(f"cannot store {key}")
            with self.lock:
                self.stored[key] = (data, content_type, metadata)
        finally:
            with self.lock:
                self.running -= 1


def test_uploads_run_concurrently_and_report_each_item_once() -> None:
    storage = SlowStorage(delay=0.1)
    done: list[tuple[str, object]] = []
    started = time.perf_counter()
    with Uploader(storage, workers=4) as uploader:
        futures = [
            uploader.submit(f"k{n}", f"data{n}".encode(), "image/png", {"n": str(n)}, lambda k, e: done.append((k, e)))
            for n in range(8)
        ]
        keys = uploader.drain()
    took = time.perf_counter() - started
    assert keys == [f"k{n}" for n in range(8)]  # submit order
    assert [f.result() for f in futures] == keys
    assert storage.most >= 2  # several puts at once
    assert took < 8 * 0.1  # faster than one after another
    assert sorted(done) == sorted((f"k{n}", None) for n in range(8))  # once per item, no error
    assert storage.stored["k3"] == (b"data3", "image/png", {"n": "3"})
    assert uploader.uploaded == 8


def test_callable_data_is_made_in_the_pool() -> None:
    storage = SlowStorage(delay=0)
    makers: list[str] = []

    def make() -> bytes:
        makers.append(threading.current_thread().name)
        return b"png"

    with Uploader(storage, workers=2) as uploader:
        uploader.submit("a", make, "image/png")
        uploader.drain()
    assert storage.stored["a"][0] == b"png"
    assert makers and makers[0].startswith("farm-upload")
    assert threading.current_thread().name not in makers


def test_an_upload_error_surfaces_from_drain_after_the_others_finished() -> None:
    storage = SlowStorage(delay=0.05, fail={"k2"})
    done: dict[str, list] = {}
    with Uploader(storage, workers=4) as uploader:
        for n in range(6):
            uploader.submit(f"k{n}", b"x", "image/png", None, lambda k, e: done.setdefault(k, []).append(e))
        with pytest.raises(StorageError, match="cannot store k2"):
            uploader.drain()
        assert uploader.drain() == []  # drained items are forgotten
    assert set(storage.stored) == {"k0", "k1", "k3", "k4", "k5"}
    assert all(len(calls) == 1 for calls in done.values()) and len(done) == 6
    assert isinstance(done["k2"][0], StorageError)
    assert all(done[k] == [None] for k in done if k != "k2")


def test_leaving_on_an_error_drops_queued_uploads_and_waits_for_running_ones() -> None:
    storage = SlowStorage(delay=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with Uploader(storage, workers=1) as uploader:
            futures = [uploader.submit(f"k{n}", b"x", "image/png") for n in range(5)]
            time.sleep(0.02)
            raise RuntimeError("boom")
    assert storage.running == 0  # nothing still uploading after the block
    assert futures[0].result() == "k0"
    assert any(f.cancelled() for f in futures[1:])


def test_with_file_storage(tmp_path) -> None:
    storage = FileStorage(tmp_path)
    with Uploader(storage, workers=3) as uploader:
        for n in range(5):
            uploader.submit(f"images/s/{n}.png", bytes([n]) * 10, "image/png", {"farm-seed": str(n)})
        uploader.drain()
    assert storage.get("images/s/4.png") == b"\x04" * 10
    assert storage.head("images/s/4.png") == {"farm-seed": "4"}
    assert storage.content_type("images/s/0.png") == "image/png"


class FlakyStorage(SlowStorage):
    """Fails the first ``failures`` puts of every key, then stores."""

    def __init__(self, failures: int):
        super().__init__(delay=0)
        self.failures = failures
        self.tries: dict[str, int] = {}

    def put(self, key, data, *, content_type, metadata=None):
        with self.lock:
            self.tries[key] = self.tries.get(key, 0) + 1
            failing = self.tries[key] <= self.failures
        if failing:
            raise StorageError(f"S3 put failed: SlowDown ({key})")
        super().put(key, data, content_type=content_type, metadata=metadata)


def test_retries_a_failed_put_with_the_bytes_already_made() -> None:
    storage = FlakyStorage(failures=2)
    made: list[str] = []
    waits: list[int] = []

    def backoff(attempt: int) -> float:
        waits.append(attempt)
        return 0.0

    with Uploader(storage, workers=2, retries=2, backoff=backoff) as uploader:
        uploader.submit("a", lambda: made.append("a") or b"png", "image/png")
        assert uploader.drain() == ["a"]
    assert made == ["a"]  # encoded once, stored on the third try
    assert storage.tries["a"] == 3 and storage.stored["a"][0] == b"png"
    assert uploader.retried == 2 and waits == [0, 1]


def test_gives_up_after_its_retries() -> None:
    storage = FlakyStorage(failures=5)
    with Uploader(storage, workers=1, retries=1, backoff=lambda attempt: 0.0) as uploader:
        uploader.submit("a", b"x", "image/png")
        with pytest.raises(StorageError, match="SlowDown"):
            uploader.drain()
    assert storage.tries["a"] == 2 and "a" not in storage.stored


class DeadlineStorage(SlowStorage):
    """Always unavailable; records the caller's deadline (farm.storage.base.time_limit) each put sees."""

    def __init__(self):
        super().__init__(delay=0)
        self.deadlines: list[float | None] = []

    def put(self, key, data, *, content_type, metadata=None):
        from farm.storage.base import StorageUnavailable, current_deadline

        self.deadlines.append(current_deadline())
        raise StorageUnavailable("S3 put failed: ReadTimeoutError")


def test_one_put_with_its_retries_ends_within_put_timeout() -> None:
    from farm.storage.base import StorageUnavailable

    storage = DeadlineStorage()
    uploader = Uploader(storage, workers=1, retries=100, backoff=lambda attempt: 0.2, put_timeout=0.7)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        uploader.store("a", b"x", "image/png")
    took = time.monotonic() - started
    assert 0.3 < took < 0.9  # a few retries, none started past the deadline
    assert 2 <= len(storage.deadlines) <= 4
    # the storage backend sees the same absolute deadline on every attempt (S3Storage bounds its own attempts by it)
    assert len(set(storage.deadlines)) == 1 and abs(storage.deadlines[0] - (started + 0.7)) < 0.1
    uploader.close()


def test_make_and_store_are_the_two_halves_of_an_item() -> None:
    storage = SlowStorage(delay=0)
    uploader = Uploader(storage, workers=1)
    body = uploader.make(lambda: b"png")
    uploader.store("k", body, "image/png", {"farm-seed": "1"})
    assert storage.stored["k"] == (b"png", "image/png", {"farm-seed": "1"})
    assert uploader.uploaded == 1
    assert uploader.run(lambda a, b: a + b, 2, 3).result(timeout=5) == 5
    uploader.close()

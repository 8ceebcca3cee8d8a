"""workers.finishing.finisher: chunks finish (encode, upload, record) in the background, leases renewed, failures given back."""

from __future__ import annotations

import threading
import time

import pytest

from farm.errors import StorageError
from workers.finishing.finisher import Finisher, Item
from workers.finishing.uploader import Uploader


class Store:
    """In-memory storage: ``put`` takes ``delay`` s; keys in ``fail`` always raise StorageError."""

    def __init__(self, delay: float = 0.0, fail: set[str] | None = None):
        self.delay = delay
        self.fail = fail or set()
        self.objects: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def put(self, key, data, *, content_type, metadata=None):
        time.sleep(self.delay)
        if key in self.fail:
            raise StorageError(f"S3 put failed: SlowDown ({key})")
        with self.lock:
            self.objects[key] = data


class Db:
    """What the finisher writes: records (with whether the object existed then) and lease renewals."""

    def __init__(self, store: Store, *, lost: set[str] | None = None, broken: bool = False):
        self.store = store
        self.lost = lost or set()
        self.broken = broken
        self.records: dict[str, tuple[str, bool, dict]] = {}
        self.renewals: list[list[str]] = []
        self.given_back: list[tuple[list[str], BaseException]] = []

    def record(self, token, image_id, key, values) -> bool:
        if self.broken:
            raise ConnectionError("database unreachable")
        if image_id in self.lost:
            return False
        self.records[image_id] = (token, key in self.store.objects, dict(values))
        return True

    def renew(self, tokens) -> None:
        self.renewals.append(list(tokens))

    def give_back(self, ids, error) -> None:
        self.given_back.append((ids, error))


def items(prefix: str, n: int) -> list[Item]:
    return [
        Item(image_id=f"{prefix}{i}", key=f"images/{prefix}{i}.png", make=lambda i=i: bytes([i]) * 8,
             metadata={"farm-seed": str(i)}, values={"gpu_seconds": 0.5})
        for i in range(n)
    ]


def finisher(store: Store, db: Db, *, max_pending: int = 2, renew_every: float = 60.0, retries: int = 0) -> Finisher:
    uploader = Uploader(store, workers=4, retries=retries, backoff=lambda attempt: 0.0)
    return Finisher(uploader, record=db.record, renew=db.renew, renew_every=renew_every, max_pending=max_pending)


def test_hand_off_returns_at_once_and_each_image_is_recorded_after_its_upload() -> None:
    store = Store(delay=0.2)
    db = Db(store)
    fin = finisher(store, db)
    started = time.perf_counter()
    handoff = fin.hand_off("tok", items("a", 4), db.give_back)
    assert time.perf_counter() - started < 0.1  # the task goes on rendering while these upload
    assert not handoff.done and db.records == {}
    assert fin.wait(timeout=10)
    assert sorted(handoff.recorded) == ["a0", "a1", "a2", "a3"]
    assert all(token == "tok" and existed for token, existed, _ in db.records.values())
    assert db.records["a2"][2] == {"gpu_seconds": 0.5}
    assert store.objects["images/a3.png"] == b"\x03" * 8
    assert db.given_back == [] and fin.pending == 0
    fin.close()


def test_at_most_max_pending_hand_offs_are_in_flight() -> None:
    store = Store(delay=0.3)
    db = Db(store)
    fin = finisher(store, db, max_pending=1)
    first = fin.hand_off("t1", items("a", 2))
    second = fin.hand_off("t2", items("b", 2))  # blocks until the first finished: memory stays bounded
    assert first.done
    assert fin.wait(timeout=10) and second.done
    assert set(db.records) == {"a0", "a1", "b0", "b1"}
    fin.close()


def test_leases_of_unfinished_hand_offs_are_renewed() -> None:
    store = Store(delay=0.4)
    db = Db(store)
    fin = finisher(store, db, renew_every=0.05)
    fin.hand_off("slow", items("a", 1))
    fin.wait(timeout=10)
    renewed = list(db.renewals)
    assert renewed and all(tokens == ["slow"] for tokens in renewed)
    time.sleep(0.2)
    assert len(db.renewals) <= len(renewed) + 1  # nothing pending: nothing renewed
    fin.close()


def test_images_that_cannot_be_stored_are_given_back_the_rest_recorded() -> None:
    store = Store(fail={"images/a1.png"})
    db = Db(store)
    fin = finisher(store, db, retries=2)
    handoff = fin.hand_off("tok", items("a", 3), db.give_back)
    fin.wait(timeout=10)
    assert sorted(db.records) == ["a0", "a2"]
    assert handoff.failed == ["a1"]
    [(ids, error)] = db.given_back
    assert ids == ["a1"] and isinstance(error, StorageError) and "SlowDown" in str(error)
    fin.close()


def test_a_database_error_while_recording_gives_the_images_back() -> None:
    store = Store()
    db = Db(store, broken=True)
    fin = finisher(store, db)
    fin.hand_off("tok", items("a", 2), db.give_back)
    fin.wait(timeout=10)
    [(ids, error)] = db.given_back
    assert sorted(ids) == ["a0", "a1"] and isinstance(error, ConnectionError)
    fin.close()


def test_a_lost_claim_is_neither_recorded_nor_given_back() -> None:
    store = Store()
    db = Db(store, lost={"a0"})  # canceled while it uploaded
    fin = finisher(store, db)
    handoff = fin.hand_off("tok", items("a", 2), db.give_back)
    fin.wait(timeout=10)
    assert handoff.lost == ["a0"] and handoff.recorded == ["a1"] and db.given_back == []
    fin.close()


def test_close_finishes_what_was_handed_off() -> None:
    store = Store(delay=0.2)
    db = Db(store)
    fin = finisher(store, db)
    fin.hand_off("tok", items("a", 3))
    assert fin.close(timeout=10) is True
    assert sorted(db.records) == ["a0", "a1", "a2"]
    with pytest.raises(RuntimeError):
        fin.hand_off("tok", items("b", 1))  # closed


def test_an_empty_hand_off_is_done_at_once() -> None:
    store = Store()
    fin = finisher(store, Db(store))
    assert fin.hand_off("tok", []).done
    fin.close()

"""workers.finishing.finisher: chunks finish (encode, upload, record) in the background, leases renewed, failures given back."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from farm.errors import StorageError
from workers.finishing.finisher import Finisher, Item
from workers.finishing.uploader import Uploader


#: Whether the finishers below record a hand-off's images together (``record_many``, as the worker
#: does) or one by one (``record``); every test runs both ways.
BATCHED = {"on": False}


@pytest.fixture(autouse=True, params=["per_image", "per_chunk"])
def recording(request):
    BATCHED["on"] = request.param == "per_chunk"
    yield request.param
    BATCHED["on"] = False


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
        self.batches: list[list[str]] = []

    def record(self, token, image_id, key, values) -> bool:
        if self.broken:
            raise ConnectionError("database unreachable")
        if image_id in self.lost:
            return False
        self.records[image_id] = (token, key in self.store.objects, dict(values))
        return True

    def record_many(self, token, rows) -> list[str]:
        self.batches.append([image_id for image_id, _key, _values in rows])
        return [image_id for image_id, key, values in rows if self.record(token, image_id, key, values)]

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
    fin = Finisher(uploader, record=db.record, renew=db.renew, renew_every=renew_every, max_pending=max_pending)
    fin.record_many = db.record_many if BATCHED["on"] else None
    return fin


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


# -- storage outages: the spool ------------------------------------------------------------------------

from farm.storage.base import StorageUnavailable, current_deadline  # noqa: E402
from workers.finishing.spool import Spool  # noqa: E402


class Outage(Store):
    """A store that can be ``down`` (refuses at once), ``hung`` (answers nothing until the caller's
    deadline, like S3 behind read timeouts) or fail its next ``fail_next`` puts; counts every put."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.hung = False
        self.fail_next = 0
        self.denied = False
        self.puts: dict[str, int] = {}
        self.attempt_seconds: list[float] = []

    def put(self, key, data, *, content_type, metadata=None):
        started = time.monotonic()
        with self.lock:
            self.puts[key] = self.puts.get(key, 0) + 1
            failing = self.fail_next > 0
            self.fail_next -= failing
        if self.hung:
            deadline = current_deadline()
            time.sleep(max(0.0, deadline - time.monotonic()) if deadline is not None else 5.0)
            self.attempt_seconds.append(time.monotonic() - started)
            raise StorageUnavailable(f"S3 put failed ({key}): ReadTimeoutError")
        if self.denied:
            raise StorageError(f"S3 put failed ({key}): AccessDenied")
        if self.down or failing:
            raise StorageUnavailable(f"S3 put failed ({key}): EndpointConnectionError: connection refused")
        super().put(key, data, content_type=content_type, metadata=metadata)


class Rows:
    """The images' rows as ``lifecycle.record_success`` sees them, with and without ``adopt``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: dict[str, dict] = {}  # image id -> status, token, expired
        self.recorded: dict[str, list[tuple[str, str]]] = {}  # image id -> [(how, token)]
        self.renewals: list[list[str]] = []
        self.given_back: list[tuple[list[str], BaseException]] = []

    def claim(self, token: str, ids) -> None:
        for image_id in ids:
            self.rows[image_id] = {"status": "running", "token": token, "expired": False}

    def _record(self, how, token, image_id, key, values) -> bool:
        with self.lock:
            row = self.rows[image_id]
            mine = row["status"] == "running" and row["token"] == token
            if how == "adopt":
                mine = mine or row["status"] == "queued" or (row["status"] == "running" and row["expired"])
            if not mine:
                return False
            row["status"] = "succeeded"
            self.recorded.setdefault(image_id, []).append((how, token))
            return True

    def record(self, token, image_id, key, values) -> bool:
        return self._record("record", token, image_id, key, values)

    def adopt(self, token, image_id, key, values) -> bool:
        return self._record("adopt", token, image_id, key, values)

    def record_many(self, token, rows) -> list[str]:
        return [image_id for image_id, key, values in rows if self._record("record", token, image_id, key, values)]

    def renew(self, tokens) -> None:
        self.renewals.append(list(tokens))

    def give_back(self, ids, error) -> None:
        self.given_back.append((ids, error))


def spooling(store, rows: Rows, folder, *, max_bytes: int = 10_000, max_pending: int = 2, put_timeout=None, **kwargs) -> Finisher:
    uploader = Uploader(store, workers=4, retries=0, put_timeout=put_timeout)
    options = {"renew_every": 0.05, "retry_base": 0.02, "retry_cap": 0.1, **kwargs}
    fin = Finisher(uploader, record=rows.record, adopt=rows.adopt, renew=rows.renew, max_pending=max_pending,
                   spool=Spool(folder, max_bytes=max_bytes), **options)
    fin.record_many = rows.record_many if BATCHED["on"] else None
    return fin


def until(condition, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_while_storage_is_down_images_wait_in_the_spool_then_are_recorded_once(tmp_path) -> None:
    store, rows = Outage(), Rows()
    store.down = True
    fin = spooling(store, rows, tmp_path)
    rows.claim("tok", [f"a{i}" for i in range(3)])
    handoff = fin.hand_off("tok", items("a", 3), rows.give_back)
    assert until(lambda: handoff.settled)  # the task goes on: its slot is free…
    assert not handoff.done and sorted(handoff.spooled) == ["a0", "a1", "a2"] and len(fin.spool) == 3
    assert not fin.storage_up and rows.recorded == {}
    time.sleep(0.3)
    assert rows.renewals and all(tokens == ["tok"] for tokens in rows.renewals)  # …its claim still held
    store.down = False
    assert fin.wait(timeout=10) and handoff.done
    assert sorted(handoff.recorded) == ["a0", "a1", "a2"] and handoff.failed == [] and rows.given_back == []
    assert all(rows.recorded[f"a{i}"] == [("adopt", "tok")] for i in range(3))
    assert store.objects == {f"images/a{i}.png": bytes([i]) * 8 for i in range(3)}
    assert len(fin.spool) == 0 and fin.storage_up and fin.stats["unspooled"] == 3
    assert fin.close(timeout=5)


def test_a_store_that_fails_a_few_times_then_recovers_fails_no_image(tmp_path) -> None:
    store, rows = Outage(), Rows()
    store.fail_next = 5
    fin = spooling(store, rows, tmp_path, max_pending=4)
    handoffs = []
    for chunk in "abc":
        rows.claim(f"tok-{chunk}", [f"{chunk}{i}" for i in range(4)])
        handoffs.append(fin.hand_off(f"tok-{chunk}", items(chunk, 4), rows.give_back))
    assert fin.wait(timeout=10)
    assert sorted(rows.recorded) == sorted(f"{c}{i}" for c in "abc" for i in range(4))
    assert all(len(how) == 1 for how in rows.recorded.values())  # each recorded once
    assert rows.given_back == [] and not any(h.failed for h in handoffs)
    assert len(store.objects) == 12 and len(fin.spool) == 0
    fin.close(timeout=5)


def test_a_hung_store_fails_the_attempt_within_put_timeout_then_the_spool_takes_over(tmp_path) -> None:
    store, rows = Outage(), Rows()
    store.hung = True
    fin = spooling(store, rows, tmp_path, put_timeout=0.5)
    rows.claim("tok", ["a0", "a1"])
    started = time.monotonic()
    handoff = fin.hand_off("tok", items("a", 2), rows.give_back)
    assert until(lambda: handoff.settled)
    assert time.monotonic() - started < 0.5 + 0.4  # one hung attempt, not the store's own patience
    assert store.attempt_seconds and max(store.attempt_seconds) < 0.5 + 0.1
    store.hung = False
    assert fin.wait(timeout=10) and sorted(handoff.recorded) == ["a0", "a1"] and rows.given_back == []
    fin.close(timeout=5)


def test_a_full_spool_blocks_hand_off_until_storage_answers(tmp_path) -> None:
    store, rows = Outage(), Rows()
    store.down = True
    fin = spooling(store, rows, tmp_path, max_bytes=16, max_pending=4)  # two 8-byte images fill it
    rows.claim("t1", ["a0", "a1"])
    rows.claim("t2", ["b0"])
    first = fin.hand_off("t1", items("a", 2), rows.give_back)
    assert until(lambda: first.settled) and fin.spool.full
    assert not fin.wait_for_room(timeout=0.1)
    returned = threading.Event()
    second = []
    thread = threading.Thread(target=lambda: (second.append(fin.hand_off("t2", items("b", 1), rows.give_back)), returned.set()))
    thread.start()
    time.sleep(0.5)
    assert not returned.is_set()  # the task does not return: the worker takes no new task
    store.down = False
    assert returned.wait(10) and fin.wait(timeout=10)
    thread.join()
    assert sorted(rows.recorded) == ["a0", "a1", "b0"] and rows.given_back == []
    fin.close(timeout=5)


def test_a_restarted_finisher_drains_its_spool_first_and_adopts_what_nobody_rendered_again(tmp_path, caplog) -> None:
    store, rows = Outage(), Rows()
    store.down = True
    first = spooling(store, rows, tmp_path)
    rows.claim("old", [f"a{i}" for i in range(4)])
    handoff = first.hand_off("old", items("a", 4), rows.give_back)
    assert until(lambda: handoff.settled)
    started = time.monotonic()
    assert first.close(timeout=30) is False  # storage is down: what is spooled stays, no waiting
    assert time.monotonic() - started < 2
    assert rows.given_back == [] and rows.recorded == {}

    # the process is gone: its leases ran out; a3 was taken over by a live claim elsewhere
    for image_id in ("a0", "a1", "a2"):
        rows.rows[image_id]["expired"] = True
    rows.rows["a3"] = {"status": "running", "token": "other", "expired": False}
    store.down = False
    second = spooling(store, rows, tmp_path)
    assert len(second.spool) == 4
    report = second.drain_spool(timeout=10)
    assert report == {"left": 0, "recorded": 3, "lost": 1, "dropped": 0}
    assert rows.recorded == {f"a{i}": [("adopt", "old")] for i in range(3)}  # recorded once, never rendered again
    assert rows.rows["a3"]["status"] == "running" and len(second.spool) == 0
    assert second.close(timeout=5)


def test_drain_spool_without_storage_returns_after_its_timeout_and_renews_the_spooled_claims(tmp_path) -> None:
    store, rows = Outage(), Rows()
    spool = Spool(tmp_path, max_bytes=1000)
    spool.put(image_id="a0", key="images/a0.png", token="old", data=b"png", content_type="image/png")
    spool.close()
    store.down = True
    fin = spooling(store, rows, tmp_path)
    started = time.monotonic()
    assert fin.drain_spool(timeout=0.3)["left"] == 1
    assert 0.3 <= time.monotonic() - started < 1.5
    assert until(lambda: ["old"] in rows.renewals)  # a previous process's claim, kept alive while it waits
    rows.claim("old", ["a0"])
    store.down = False
    assert until(lambda: len(fin.spool) == 0) and rows.recorded == {"a0": [("adopt", "old")]}
    fin.close(timeout=5)


def test_a_damaged_spooled_file_is_dropped_and_the_others_recorded(tmp_path, caplog) -> None:
    store, rows = Outage(), Rows()
    store.down = True
    first = spooling(store, rows, tmp_path)
    rows.claim("tok", ["a0", "a1", "a2"])
    handoff = first.hand_off("tok", items("a", 3), rows.give_back)
    assert until(lambda: handoff.settled)
    first.close(timeout=0)
    [damaged] = [e for e in first.spool.entries() if e.image_id == "a1"]
    (tmp_path / f"{damaged.name}.data").write_bytes(b"\xff" * 8)
    store.down = False
    second = spooling(store, rows, tmp_path)
    with caplog.at_level(logging.WARNING):
        assert second.drain_spool(timeout=10) == {"left": 0, "recorded": 2, "lost": 0, "dropped": 1}
    assert sorted(rows.recorded) == ["a0", "a2"] and "images/a1.png" not in store.objects
    assert "dropping spooled image a1" in caplog.text
    second.close(timeout=5)


def test_images_waiting_past_give_up_after_are_given_back(tmp_path) -> None:
    store, rows = Outage(), Rows()
    store.down = True
    fin = spooling(store, rows, tmp_path, give_up_after=0.3)
    rows.claim("tok", ["a0", "a1"])
    handoff = fin.hand_off("tok", items("a", 2), rows.give_back)
    assert handoff.wait(timeout=10)
    assert sorted(handoff.failed) == ["a0", "a1"] and rows.recorded == {} and len(fin.spool) == 0
    given = sorted(i for ids, _ in rows.given_back for i in ids)
    assert given == ["a0", "a1"] and all(isinstance(e, StorageUnavailable) for _, e in rows.given_back)
    assert "FARM_UPLOAD_DEADLINE_SECONDS" in str(rows.given_back[0][1])
    fin.close(timeout=1)


def test_without_a_spool_an_unavailable_store_gives_the_images_back(tmp_path) -> None:
    store, rows = Outage(), Rows()
    store.down = True
    fin = Finisher(Uploader(store, workers=2), record=rows.record, renew=rows.renew, renew_every=60.0)
    rows.claim("tok", ["a0"])
    handoff = fin.hand_off("tok", items("a", 1), rows.give_back)
    assert handoff.wait(timeout=10) and handoff.failed == ["a0"]
    [(ids, error)] = rows.given_back
    assert ids == ["a0"] and isinstance(error, StorageUnavailable)
    fin.close(timeout=1)


def test_a_spooled_image_that_storage_keeps_refusing_waits_until_give_up_after(tmp_path) -> None:
    store, rows = Outage(), Rows()
    store.down = True
    fin = spooling(store, rows, tmp_path, give_up_after=1.0)
    rows.claim("tok", ["a0"])
    handoff = fin.hand_off("tok", items("a", 1), rows.give_back)
    assert until(lambda: handoff.settled)
    store.down, store.denied = False, True  # credentials revoked mid-outage: not a reason to re-render at once
    time.sleep(0.5)
    assert not handoff.done and len(fin.spool) == 1 and rows.given_back == []
    assert handoff.wait(timeout=10) and handoff.failed == ["a0"] and len(fin.spool) == 0
    [(ids, _error)] = rows.given_back
    assert ids == ["a0"]
    fin.close(timeout=1)


def test_build_finisher_follows_the_settings(tmp_path) -> None:
    from farm.settings import Settings
    from farm.storage import FileStorage
    from workers.finishing.finisher import build_finisher

    settings = Settings(data_dir=tmp_path, upload_threads=3, upload_retries=1, upload_max_pending=5,
                        claim_lease_seconds=40, s3_connect_timeout=2, s3_read_timeout=10,
                        upload_deadline_seconds=600, spool_bytes=64 * 1024**2)
    store, rows = FileStorage(tmp_path / "store"), Rows()
    fin = build_finisher(settings, store, worker="gpu0@host", record=rows.record, adopt=rows.adopt, renew=rows.renew)
    assert fin.spool.folder == tmp_path / "spool" / "gpu0@host" and fin.spool.max_bytes == 64 * 1024**2
    assert fin.uploader.workers == 3 and fin.uploader.retries == 1 and fin.uploader.put_timeout == 2 + 10 + 5
    assert fin.max_pending == 5 and fin.renew_every == 10 and fin.give_up_after == 600 and fin.adopt == rows.adopt
    rows.claim("tok", ["a0"])
    assert fin.hand_off("tok", items("a", 1)).wait(timeout=10) and rows.recorded == {"a0": [("record", "tok")]}
    assert fin.close(timeout=5)


def test_the_same_image_spooled_again_under_a_new_claim_replaces_the_old_entry(tmp_path) -> None:
    store, rows = Outage(), Rows()
    store.down = True
    fin = spooling(store, rows, tmp_path)
    rows.claim("old", ["a0"])
    old = fin.hand_off("old", items("a", 1), rows.give_back)
    assert until(lambda: old.settled)
    rows.claim("new", ["a0"])  # its lease ran out during a database outage; claimed and rendered again
    new = fin.hand_off("new", items("a", 1), rows.give_back)
    assert until(lambda: new.settled) and old.done and old.lost == ["a0"]
    assert [e.token for e in fin.spool.entries()] == ["new"]
    store.down = False
    assert new.wait(timeout=10) and rows.recorded == {"a0": [("adopt", "new")]}
    fin.close(timeout=5)


def test_with_record_many_a_hand_off_is_recorded_in_one_call_after_its_last_upload(recording) -> None:
    if recording != "per_chunk":
        pytest.skip("record_many only")
    store = Store(delay=0.05, fail={"images/b2.png"})
    db = Db(store, lost={"b1"})
    fin = finisher(store, db)
    handoffs = [fin.hand_off("t1", items("a", 4), db.give_back), fin.hand_off("t2", items("b", 4), db.give_back)]
    assert fin.wait(timeout=10) and fin.close(timeout=10)
    assert sorted(map(sorted, db.batches)) == [["a0", "a1", "a2", "a3"], ["b0", "b1", "b3"]]  # one call per hand-off
    assert all(stored for _token, stored, _values in db.records.values())  # each after its own upload
    assert sorted(handoffs[1].recorded) == ["b0", "b3"] and handoffs[1].lost == ["b1"] and handoffs[1].failed == ["b2"]
    assert [ids for ids, _error in db.given_back] == [["b2"]]  # the failure still per image

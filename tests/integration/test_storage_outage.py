"""Storage outages against a real S3 server: a Finisher with a real S3Storage keeps uploading while
moto hangs (SIGSTOP, ~20 s) or refuses connections (a TCP proxy in front of it closes its port).

Every image ends up stored, with its own bytes, and recorded exactly once; none is failed, given back
or rendered again; each attempt on the hung server ends within its timeouts (botocore's defaults held
one put for ~61 s); a worker whose spool is full stops handing off until storage answers; a worker
restarted during the outage uploads its spool first and adopts its images (real lifecycle, SQLite).

Each test runs its own moto server (never the session's shared one: stopping that would stall the
other tests).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from farm.storage.s3 import S3Storage
from workers.finishing.finisher import Finisher, Item
from workers.finishing.spool import Spool
from workers.finishing.uploader import Uploader

pytestmark = pytest.mark.integration

CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 2.0
#: One put: one hung attempt (1 s waiting for "100 Continue" + the read timeout) fits, a second does not.
PUT_TIMEOUT = CONNECT_TIMEOUT + READ_TIMEOUT + 2.0
IMAGE_BYTES = 20_000


# -- servers ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def moto(tmp_path: Path, s3_env: None) -> Iterator[tuple[subprocess.Popen, int]]:
    """A private moto S3 server: (its process, its port)."""
    executable = Path(sys.executable).parent / "moto_server"
    port = _free_port()
    with open(tmp_path / "moto.log", "wb") as log:
        process = subprocess.Popen([str(executable), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "moto.log").read_text()
                time.sleep(0.05)
        yield process, port
    finally:
        os.kill(process.pid, signal.SIGCONT)  # a stopped process cannot die of SIGTERM
        process.terminate()
        process.wait(timeout=10)


class Proxy:
    """A TCP proxy to ``127.0.0.1:target`` that can refuse connections (its port closed, live
    connections cut) and come back on the same port."""

    def __init__(self, target: int):
        self.target = target
        self.port = _free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.accept()

    def accept(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        self._listener.settimeout(0.05)
        threading.Thread(target=self._serve, args=(self._listener,), daemon=True).start()

    def refuse(self) -> None:
        listener, self._listener = self._listener, None
        listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        if self._listener is not None:
            self.refuse()

    def _serve(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# -- what the tests watch ----------------------------------------------------------------------------


class AttemptClock:
    """How long each PutObject attempt of a client took, and how it ended (botocore's events)."""

    def __init__(self, storage: S3Storage):
        self._local = threading.local()
        self._lock = threading.Lock()
        self.attempts: list[tuple[float, str]] = []  # (seconds, "ok" or the exception's class)
        events = storage.client.meta.events
        events.register("before-send.s3.PutObject", self._started)
        events.register("needs-retry.s3.PutObject", self._ended)

    def _started(self, **_kwargs) -> None:
        self._local.started = time.monotonic()

    def _ended(self, caught_exception=None, **_kwargs) -> None:
        started = getattr(self._local, "started", None)
        if started is None:
            return
        outcome = "ok" if caught_exception is None else type(caught_exception).__name__
        with self._lock:
            self.attempts.append((time.monotonic() - started, outcome))
        self._local.started = None

    def failed(self) -> list[tuple[float, str]]:
        with self._lock:
            return [attempt for attempt in self.attempts if attempt[1] != "ok"]


class Rows:
    """Records as lifecycle.record_success makes them (with ``adopt``), counted per image."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: dict[str, str] = {}
        self.recorded: dict[str, list[tuple[str, str, dict]]] = {}
        self.renewed: set[str] = set()
        self.given_back: list[list[str]] = []

    def claim(self, token: str, ids: list[str]) -> None:
        self.tokens.update({image_id: token for image_id in ids})

    def record(self, token, image_id, key, values, how="record") -> bool:
        with self.lock:
            if self.tokens.get(image_id) != token or image_id in self.recorded:
                return False
            self.recorded[image_id] = [(how, key, dict(values))]
            return True

    def adopt(self, token, image_id, key, values) -> bool:
        return self.record(token, image_id, key, values, how="adopt")

    def renew(self, tokens) -> None:
        self.renewed.update(tokens)

    def give_back(self, ids, error) -> None:
        self.given_back.append(list(ids))


def chunk(prefix: str, n: int) -> list[Item]:
    return [
        Item(image_id=f"{prefix}-{i}", key=f"images/outage/{prefix}-{i}.png", make=lambda: os.urandom(IMAGE_BYTES),
             metadata={"farm-image-id": f"{prefix}-{i}"}, values={"gpu_seconds": 0.25, "n": i})
        for i in range(n)
    ]


def storage(port: int, bucket: str) -> S3Storage:
    store = S3Storage(bucket, endpoint_url=f"http://127.0.0.1:{port}", connect_timeout=CONNECT_TIMEOUT,
                      read_timeout=READ_TIMEOUT, max_attempts=2)
    return store


def finisher(store: S3Storage, rows: Rows, folder: Path, *, max_bytes: int, record=None, adopt=None, renew=None) -> Finisher:
    uploader = Uploader(store, workers=4, retries=1, backoff=lambda attempt: 0.2, put_timeout=PUT_TIMEOUT)
    return Finisher(
        uploader, record=record or rows.record, adopt=adopt or rows.adopt, renew=renew or rows.renew, renew_every=0.25,
        max_pending=2, spool=Spool(folder, max_bytes=max_bytes), retry_base=0.2, retry_cap=1.0,
    )


def stored_objects(store: S3Storage) -> dict[str, bytes]:
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix="images/outage/")
    return {item["Key"]: store.client.get_object(Bucket=store.bucket, Key=item["Key"])["Body"].read()
            for item in listing.get("Contents", [])}


def spooled_bytes(handoffs, made: dict[str, bytes]) -> None:
    """Wrap each item's make() to remember the bytes it made (to compare with what S3 holds)."""
    for handoff_items in handoffs:
        for item in handoff_items:
            make = item.make
            item.make = lambda make=make, item=item: made.setdefault(item.key, make())


# -- the tests ---------------------------------------------------------------------------------------


def test_a_hung_s3_server_delays_uploads_but_fails_no_image(moto, tmp_path: Path) -> None:
    process, port = moto
    store = storage(port, f"outage-{uuid.uuid4().hex[:12]}")
    store.ensure_bucket()
    clock = AttemptClock(store)
    rows = Rows()
    # room for 6 of the 15 images: the "task" below must stop handing off until storage answers
    fin = finisher(store, rows, tmp_path / "spool", max_bytes=6 * IMAGE_BYTES)
    chunks = {f"c{n}": chunk(f"c{n}", 3) for n in range(5)}
    made: dict[str, bytes] = {}
    spooled_bytes(chunks.values(), made)
    for name, items in chunks.items():
        rows.claim(f"token-{name}", [item.image_id for item in items])

    first = fin.hand_off("token-c0", chunks["c0"], rows.give_back)
    assert first.wait(timeout=30) and len(first.recorded) == 3

    returned: dict[str, float] = {}

    def task() -> None:  # a render loop: one chunk after the other
        for name in ("c1", "c2", "c3", "c4"):
            fin.hand_off(f"token-{name}", chunks[name], rows.give_back)
            returned[name] = time.monotonic()

    os.kill(process.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        thread = threading.Thread(target=task)
        thread.start()
        time.sleep(20)
        assert not fin.storage_up and len(fin.spool) >= 1
        assert len(returned) < 4  # the spool filled up: no more work taken while storage hangs
    finally:
        os.kill(process.pid, signal.SIGCONT)
    resumed = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive() and max(returned.values()) > resumed
    assert fin.wait(timeout=60)
    recovered = time.monotonic() - resumed

    ids = [item.image_id for items in chunks.values() for item in items]
    assert sorted(rows.recorded) == sorted(ids)  # each recorded exactly once…
    assert all(len(records) == 1 for records in rows.recorded.values())
    assert rows.recorded["c3-1"][0][2] == {"gpu_seconds": 0.25, "n": 1}
    assert rows.given_back == []  # …none failed, none given back (no re-render, no attempt counted)
    assert fin.stats["spooled"] >= 6 and len(fin.spool) == 0
    assert {"token-c1", "token-c2"} <= rows.renewed  # spooled claims kept alive
    assert stored_objects(store) == made  # every object stored, with its own bytes, nothing else

    hung = clock.failed()
    assert hung and all(outcome == "ReadTimeoutError" for _, outcome in hung)
    assert max(seconds for seconds, _ in hung) < 2 * READ_TIMEOUT  # not botocore's 60 s (+ retries)
    print(f"\nhung S3: {len(hung)} attempts timed out after {min(s for s, _ in hung):.2f}-{max(s for s, _ in hung):.2f} s "
          f"(read timeout {READ_TIMEOUT} s); stalled {resumed - stopped:.1f} s; all recorded {recovered:.1f} s after SIGCONT; "
          f"{fin.stats['spooled']} image(s) went through the spool")
    assert fin.close(timeout=10)


def test_refused_connections_and_a_restart_mid_outage_lose_and_repeat_nothing(moto, tmp_path: Path) -> None:
    from sqlalchemy import select

    from farm import db, lifecycle
    from farm.db.tables import ImageRecord
    from farm.request.spec import check_request
    from farm.settings import Settings

    _process, port = moto
    proxy = Proxy(port)
    bucket = f"outage-{uuid.uuid4().hex[:12]}"
    storage(port, bucket).ensure_bucket()
    settings = Settings(data_dir=tmp_path, max_batch_size=8)
    engine = db.make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    db.upgrade(engine)
    sessions = db.make_sessionmaker(engine)
    specs = check_request({"prompt": "a red cube", "num_images": 6, "seed": 1, "model": "tiny"}, settings).images
    _, batches = lifecycle.record(sessions, specs, num_requests=1, settings=settings)
    ids = [image_id for batch in batches for image_id in batch.image_ids]
    lease = 1.0
    claim = lifecycle.claim(sessions, ids, worker="gpu0@host/1", lease_seconds=lease, max_attempts=3)
    assert len(claim.images) == 6

    def record(token, image_id, key, values, adopt=False) -> bool:
        return lifecycle.record_success(sessions, token, image_id, adopt=adopt, storage_key=key, **values)

    def renew(tokens) -> None:
        for token in tokens:
            lifecycle.heartbeat(sessions, token, lease)

    items = [
        Item(image_id=image_id, key=f"images/outage/{image_id}.png", make=lambda: os.urandom(IMAGE_BYTES),
             values={"gpu_seconds": 0.5})
        for image_id in ids
    ]
    made: dict[str, bytes] = {}
    spooled_bytes([items], made)
    rows = Rows()
    spool_dir = tmp_path / "spool" / "gpu0@host"
    store = storage(proxy.port, bucket)
    clock = AttemptClock(store)
    first = finisher(store, rows, spool_dir, max_bytes=10**8, record=record,
                     adopt=lambda *a: record(*a, adopt=True), renew=renew)
    try:
        done = first.hand_off(claim.token, items[:2], rows.give_back)
        assert done.wait(timeout=30) and len(done.recorded) == 2

        proxy.refuse()
        refused_at = time.monotonic()
        waiting = first.hand_off(claim.token, items[2:], rows.give_back)
        assert waiting.wait(timeout=0) is False
        assert _until(lambda: waiting.settled, 30)  # spooled: the task went on
        spooled_in = time.monotonic() - refused_at
        assert sorted(waiting.spooled) == sorted(ids[2:])
        refused = [attempt for attempt in clock.failed() if attempt[1] != "ReadTimeoutError"]
        assert refused and max(seconds for seconds, _ in refused) < 1.0  # refused at once, no timeout to wait
        time.sleep(2 * lease)  # spooled claims are renewed: nobody takes them over meanwhile
        assert lifecycle.take_back_expired(sessions) == []
    finally:
        started = time.monotonic()
        assert first.close(timeout=30) is False  # the worker stops mid-outage: its spool stays on disk
        closed_in = time.monotonic() - started
    assert len(list(spool_dir.glob("*.data"))) == 4

    time.sleep(lease + 0.5)  # the process is gone: its leases run out, nobody rendered the images again
    with sessions() as session:
        assert {row.status for row in session.scalars(select(ImageRecord).where(ImageRecord.id.in_(ids[2:])))} == {"running"}

    second = finisher(storage(proxy.port, bucket), rows, spool_dir, max_bytes=10**8, record=record,
                      adopt=lambda *a: record(*a, adopt=True), renew=renew)
    assert second.drain_spool(timeout=1.0)["left"] == 4  # storage still refuses: it waits in the background
    proxy.accept()
    resumed = time.monotonic()
    report = second.drain_spool(timeout=30)
    assert report == {"left": 0, "recorded": 4, "lost": 0, "dropped": 0}
    drained_in = time.monotonic() - resumed
    assert second.close(timeout=10)
    proxy.close()

    with sessions() as session:
        rows_now = {row.id: row for row in session.scalars(select(ImageRecord).where(ImageRecord.id.in_(ids)))}
    assert {row.status for row in rows_now.values()} == {"succeeded"}
    assert all(row.attempts == 1 for row in rows_now.values())  # rendered once, no attempt counted
    assert all(row.storage_key == f"images/outage/{image_id}.png" for image_id, row in rows_now.items())
    assert rows.given_back == []
    assert stored_objects(storage(port, bucket)) == made
    print(f"\nrefused S3: spooled {len(ids) - 2} image(s) {spooled_in:.2f} s after the refusal, closed in {closed_in:.2f} s; "
          f"a new process drained and adopted them {drained_in:.2f} s after the port came back")
    engine.dispose()


def _until(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False

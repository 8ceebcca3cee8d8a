"""workers.uploader: PNG encode + upload on a thread pool (no model, no network)."""

from __future__ import annotations

import threading
import time

import pytest

from farm.errors import StorageError
from farm.storage import FileStorage
from workers.uploader import Uploader


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


# -- the render task's upload step (workers.tasks.run_render), with the database and GPU faked ------


class _Retry(Exception):
    pass


def _run_task(monkeypatch, storage, n: int = 4):
    """Run ``run_render`` past claim/render with fakes; return (outcome, recorded, released)."""
    import uuid
    from types import SimpleNamespace

    from PIL import Image

    from farm import claims
    from farm.keys import image_key
    from farm.spec import ImageSpec
    from workers import tasks
    from workers.render import BatchResult, Rendered

    specs = [
        ImageSpec(prompt="a cat", negative_prompt="", seed=s, steps=4, guidance_scale=7.5, width=64, height=64,
                  scheduler="dpmpp_2m", model="tiny")
        for s in range(n)
    ]
    images = [SimpleNamespace(id=uuid.uuid4().hex, submission_id=uuid.uuid4().hex, params=s.params()) for s in specs]
    recorded: list[tuple[str, bool]] = []
    released: list[str] = []

    def record_success(sessions, token, image_id, *, storage_key, **values):
        recorded.append((image_id, storage.exists(storage_key)))  # was it uploaded before the record?
        return True

    monkeypatch.setattr(claims, "claim", lambda *a, **k: claims.Claim(token="t", images=images))
    monkeypatch.setattr(claims, "record_success", record_success)
    monkeypatch.setattr(tasks, "_fetch_inputs", lambda ctx, claim, specs: (images, specs, [None] * len(specs)))
    monkeypatch.setattr(tasks, "_activate_loras", lambda ctx, loras: [])
    monkeypatch.setattr(tasks, "_release_quietly", lambda ctx, token, note: released.append(note))
    rendered = [Rendered(image=Image.new("RGB", (64, 64), (n * 40, 0, 0)), prompt_tokens=2, prompt_truncated=False)
                for n in range(n)]
    monkeypatch.setattr(tasks, "_render", lambda *a: BatchResult(images=rendered, seconds=1.0, interrupted=False))

    def retry(exc, countdown):
        return _Retry(str(exc))

    task = SimpleNamespace(request=SimpleNamespace(hostname="h", retries=0), retry=retry)
    ctx = SimpleNamespace(
        settings=SimpleNamespace(claim_lease_seconds=60), model_name="tiny", device="cpu", sessions=None,
        storage=storage, model=SimpleNamespace(hash="abcdef1234", path="/models/tiny"),
    )
    try:
        outcome = tasks.run_render(task, ctx, [i.id for i in images], "tiny")
    except _Retry as exc:
        outcome = exc
    keys = [image_key(i.submission_id, i.id) for i in images]
    return outcome, recorded, released, keys


def test_task_records_each_image_only_after_its_upload(monkeypatch, tmp_path) -> None:
    from farm.pnginfo import read_png_metadata

    storage = FileStorage(tmp_path)
    outcome, recorded, released, keys = _run_task(monkeypatch, storage)
    assert outcome == {"rendered": 4, "seconds": 1.0}
    assert len(recorded) == 4 and all(uploaded for _, uploaded in recorded)
    assert not released
    parameters, spec = read_png_metadata(storage.get(keys[2]))
    assert spec["seed"] == 2 and "Seed: 2" in parameters
    assert storage.head(keys[2])["farm-seed"] == "2"


class _FailingFileStorage(FileStorage):
    """File storage whose ``fail_index``-th put (counting from 0) raises a ``StorageError``."""

    def __init__(self, root, fail_index: int):
        super().__init__(root)
        self.fail_index = fail_index
        self.calls = 0
        self.lock = threading.Lock()

    def put(self, key, data, **kwargs):
        with self.lock:
            self.calls += 1
            failing = self.calls == 1 + self.fail_index
        if failing:
            raise StorageError("S3 put failed: SlowDown")
        super().put(key, data, **kwargs)


def test_task_upload_error_releases_and_retries_and_leaves_no_record_pointing_nowhere(monkeypatch, tmp_path) -> None:
    storage = _FailingFileStorage(tmp_path, fail_index=1)
    outcome, recorded, released, keys = _run_task(monkeypatch, storage)
    assert isinstance(outcome, _Retry) and "SlowDown" in str(outcome)
    assert len(released) == 1 and "StorageError" in released[0]
    assert all(uploaded for _, uploaded in recorded)  # whatever was recorded exists
    assert len(recorded) < 4

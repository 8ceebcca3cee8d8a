"""workers.lora.disk_cache: verified, atomic, shared, size-capped LoRA files on a worker's disk (no torch)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from farm.storage.keys import content_key
from farm.storage import FileStorage
from workers.lora.disk_cache import LoraDiskCache, LoraError

KB = 1024


class CountingStorage:
    """A FileStorage that counts (and can slow down) ``get`` calls."""

    def __init__(self, root: Path, delay: float = 0.0):
        self.inner = FileStorage(root)
        self.url = self.inner.url
        self.delay = delay
        self.gets: list[str] = []
        self._lock = threading.Lock()

    def put(self, key, data, *, content_type="application/octet-stream", metadata=None):
        self.inner.put(key, data, content_type=content_type, metadata=metadata)

    def get(self, key: str) -> bytes:
        with self._lock:
            self.gets.append(key)
        time.sleep(self.delay)
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)


def _lora(storage: CountingStorage, n: int, size: int = 4 * KB) -> tuple[str, str, bytes]:
    """Register a fake LoRA of ``size`` bytes: (sha256, key, data)."""
    data = (f"lora-{n}-".encode() * size)[:size]
    sha = hashlib.sha256(data).hexdigest()
    key = content_key("loras", sha, "safetensors")
    storage.put(key, data)
    return sha, key, data


def _files(folder: Path) -> list[str]:
    """Everything in the cache folder except the lock files."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".locks")


@pytest.fixture
def storage(tmp_path: Path) -> CountingStorage:
    return CountingStorage(tmp_path / "store")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_download_then_disk_hit(storage: CountingStorage, folder: Path) -> None:
    cache = LoraDiskCache(storage, folder, max_bytes=1 << 20, min_free_bytes=0)
    sha, key, data = _lora(storage, 1)
    path, how = cache.path(sha, key)
    assert how == "download" and path == folder / f"{sha}.safetensors"
    assert path.read_bytes() == data
    assert cache.path(sha, key) == (path, "disk")
    # A second cache object (another worker process on the machine) finds it too.
    assert LoraDiskCache(storage, folder, max_bytes=1 << 20, min_free_bytes=0).path(sha, key) == (path, "disk")
    assert storage.gets == [key]
    assert _files(folder) == [path.name]
    assert cache.entries() == [(sha, len(data))]


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_corrupt_download_raises_and_leaves_nothing(storage: CountingStorage, folder: Path, damage: str) -> None:
    cache = LoraDiskCache(storage, folder, max_bytes=1 << 20, min_free_bytes=0)
    good = b"x" * 4 * KB
    bad = good[:-100] if damage == "truncated" else good[:100] + b"y" + good[101:]
    sha = hashlib.sha256(good).hexdigest()
    key = content_key("loras", sha, "safetensors")
    storage.put(key, bad)
    with pytest.raises(LoraError, match="truncated or altered") as raised:
        cache.path(sha, key)
    assert sha in str(raised.value) and hashlib.sha256(bad).hexdigest() in str(raised.value)
    assert _files(folder) == []  # no file, no temp file
    # Once storage holds the right bytes, the same cache serves it.
    storage.put(key, good)
    path, how = cache.path(sha, key)
    assert how == "download" and path.read_bytes() == good


def test_missing_object_and_bad_sha(storage: CountingStorage, folder: Path) -> None:
    cache = LoraDiskCache(storage, folder, max_bytes=1 << 20, min_free_bytes=0)
    sha = "ab" * 32
    with pytest.raises(LoraError, match="not in storage"):
        cache.path(sha, content_key("loras", sha, "safetensors"))
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.path("../../etc/passwd", "loras/x")
    assert _files(folder) == []


def test_concurrent_threads_download_once(tmp_path: Path, folder: Path) -> None:
    storage = CountingStorage(tmp_path / "store", delay=0.3)
    sha, key, data = _lora(storage, 1)
    cache = LoraDiskCache(storage, folder, max_bytes=1 << 20, min_free_bytes=0)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: cache.path(sha, key), range(4)))
    assert storage.gets == [key]
    assert {path for path, _ in results} == {folder / f"{sha}.safetensors"}
    assert sorted(how for _, how in results) == ["disk", "disk", "disk", "download"]
    assert results[0][0].read_bytes() == data


def test_concurrent_processes_download_once(tmp_path: Path, folder: Path) -> None:
    storage = CountingStorage(tmp_path / "store")
    sha, key, data = _lora(storage, 1)
    log = tmp_path / "gets.log"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from farm.storage import FileStorage
        from workers.lora.disk_cache import LoraDiskCache

        class Slow(FileStorage):
            def get(self, key):
                with open({str(log)!r}, "a") as f:
                    f.write(key + "\\n")
                time.sleep(0.5)
                return super().get(key)

        while time.time() < float(sys.argv[1]):  # start together
            time.sleep(0.005)
        cache = LoraDiskCache(Slow({str(storage.inner.root)!r}), Path({str(folder)!r}), max_bytes=1 << 20, min_free_bytes=0)
        print(cache.path({sha!r}, {key!r})[1])
        """
    )
    start = str(time.time() + 1.5)
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen([sys.executable, "-c", script, start], cwd=root, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outputs == ["disk", "disk", "download"]
    assert log.read_text().splitlines() == [key]
    assert (folder / f"{sha}.safetensors").read_bytes() == data


def test_lru_eviction_under_max_bytes(storage: CountingStorage, folder: Path) -> None:
    size = 4 * KB
    cache = LoraDiskCache(storage, folder, max_bytes=int(2.5 * size), min_free_bytes=0)
    a, b, c = (_lora(storage, n, size) for n in (1, 2, 3))
    cache.path(*a[:2])
    cache.path(*b[:2])
    assert cache.path(*a[:2])[1] == "disk"  # a is now more recent than b
    assert cache.path(*c[:2])[1] == "download"  # needs room: b, the least recently used, goes
    assert [sha for sha, _ in cache.entries()] == [a[0], c[0]]
    assert cache.total_bytes() == 2 * size
    assert cache.path(*b[:2])[1] == "download"  # b comes back, evicting a now
    assert [sha for sha, _ in cache.entries()] == [c[0], b[0]]


def test_returned_file_is_never_evicted_and_too_big_is_refused(storage: CountingStorage, folder: Path) -> None:
    size = 4 * KB
    cache = LoraDiskCache(storage, folder, max_bytes=size, min_free_bytes=0)
    a, b = _lora(storage, 1, size), _lora(storage, 2, size)
    path_a, _ = cache.path(*a[:2])
    path_b, _ = cache.path(*b[:2])
    assert path_b.exists() and not path_a.exists()
    big = _lora(storage, 3, size + 1)
    with pytest.raises(LoraError, match="larger than the whole LoRA cache"):
        cache.path(*big[:2])
    assert path_b.exists()


Usage = namedtuple("Usage", "total used free")


def _fake_disk(monkeypatch: pytest.MonkeyPatch, folder: Path, capacity: int) -> None:
    """A disk of ``capacity`` bytes holding only the cache's LoRA files."""

    def disk_usage(path):
        used = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
        return Usage(capacity, used, capacity - used)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_free_disk_floor_evicts_lru(storage: CountingStorage, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 4 * KB
    _fake_disk(monkeypatch, folder, capacity=10 * size)
    # max_bytes alone would keep all three; the floor (8 files' worth free of 10) allows only two.
    cache = LoraDiskCache(storage, folder, max_bytes=100 * size, min_free_bytes=8 * size)
    a, b, c = (_lora(storage, n, size) for n in (1, 2, 3))
    cache.path(*a[:2])
    cache.path(*b[:2])
    cache.path(*a[:2])
    assert cache.path(*c[:2])[1] == "download"
    assert [sha for sha, _ in cache.entries()] == [a[0], c[0]]
    assert shutil.disk_usage(folder).free >= 8 * size


def test_free_disk_floor_raises_when_eviction_is_not_enough(
    storage: CountingStorage, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 4 * KB
    _fake_disk(monkeypatch, folder, capacity=10 * size)
    cache = LoraDiskCache(storage, folder, max_bytes=100 * size, min_free_bytes=9 * size + 1)
    a = _lora(storage, 1, size)
    with pytest.raises(LoraError, match="not enough disk space"):
        cache.path(*a[:2])
    assert _files(folder) == []
    # With another file cached, it is evicted first, and the error still comes when that is not enough.
    cache.min_free_bytes = 8 * size
    b = _lora(storage, 2, size)
    cache.path(*b[:2])
    cache.min_free_bytes = 9 * size + 1
    with pytest.raises(LoraError, match="not enough disk space"):
        cache.path(*a[:2])
    assert _files(folder) == []


def test_writes_are_atomic(storage: CountingStorage, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = LoraDiskCache(storage, folder, max_bytes=1 << 20, min_free_bytes=0)
    sha, key, data = _lora(storage, 1)
    # A stale temp file from a crashed download is neither served nor counted.
    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / f".{sha}.crashed.tmp"
    stale.write_bytes(data[:10])
    assert cache.entries() == [] and cache.total_bytes() == 0

    # A write that fails before the rename leaves no file under the final name and no temp file.
    def failing_fsync(fd):
        raise OSError(5, "simulated I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="simulated"):
            cache.path(sha, key)
    assert _files(folder) == [stale.name]

    # While a download is in flight, the final name does not exist; afterwards it is complete.
    seen: list[bool] = []
    original_replace = os.replace

    def watching_replace(src, dst):
        seen.append(Path(dst).exists())
        assert Path(src).name.startswith(".") and Path(src).read_bytes() == data
        return original_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", watching_replace)
        path, how = cache.path(sha, key)
    assert how == "download" and seen == [False]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert _files(folder) == sorted([stale.name, path.name])


def test_a_short_write_is_no_space_and_leaves_nothing(storage: CountingStorage, folder: Path, monkeypatch) -> None:
    """A full disk that truncates silently: farm.storage.atomic_write sees fewer bytes than it wrote,
    renames nothing, and the cache says there is no space."""
    import farm.storage.base

    cache = LoraDiskCache(storage, folder, max_bytes=1 << 20, min_free_bytes=0)
    sha, key, data = _lora(storage, 1)
    monkeypatch.setattr(farm.storage.base.os.path, "getsize", lambda path: len(data) - 1)
    with pytest.raises(LoraError, match=f"no space left to cache LoRA {sha}.*{len(data) - 1} of {len(data)} bytes"):
        cache.path(sha, key)
    monkeypatch.undo()
    assert _files(folder) == []  # no partial file, no temp file
    assert cache.path(sha, key)[1] == "download"  # the next try downloads it whole

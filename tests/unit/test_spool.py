"""workers.finishing.spool: a bounded folder of images waiting for storage that outlives the process."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from workers.finishing.spool import CorruptEntry, Spool, SpoolBusy, spool_folder

VALUES = {"gpu_seconds": 0.5, "prompt_tokens": 7, "prompt_truncated": False, "info": {"device": "cpu", "loras": []}}


def put(spool: Spool, image_id: str, data: bytes, **kwargs) -> object:
    options = {
        "key": f"images/sub/{image_id}.png", "token": "tok-1", "content_type": "image/png",
        "metadata": {"farm-image-id": image_id}, "values": VALUES, **kwargs,
    }
    return spool.put(image_id=image_id, data=data, **options)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock")


def test_an_entry_is_two_files_named_by_the_bytes_sha256(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    entry = put(spool, "img-1", b"png-bytes")
    sha = hashlib.sha256(b"png-bytes").hexdigest()
    assert entry.name == f"img-1.{sha}" and entry.sha256 == sha and entry.size == 9
    assert files(tmp_path) == [f"img-1.{sha}.data", f"img-1.{sha}.json"]  # no temp file left behind
    assert (tmp_path / f"img-1.{sha}.data").read_bytes() == b"png-bytes"
    sidecar = json.loads((tmp_path / f"img-1.{sha}.json").read_text())
    assert sidecar["image_id"] == "img-1" and sidecar["key"] == "images/sub/img-1.png" and sidecar["token"] == "tok-1"
    assert sidecar["content_type"] == "image/png" and sidecar["metadata"] == {"farm-image-id": "img-1"}
    assert sidecar["values"] == VALUES and sidecar["sha256"] == sha and sidecar["size"] == 9
    assert spool.read(entry) == b"png-bytes"
    assert len(spool) == 1 and spool.used_bytes == 9 and spool.tokens() == {"tok-1"}
    spool.remove(entry)
    assert files(tmp_path) == [] and len(spool) == 0 and spool.used_bytes == 0
    spool.close()


def test_entries_survive_a_new_spool_on_the_same_folder(tmp_path: Path) -> None:
    first = Spool(tmp_path, max_bytes=1000)
    written = [put(first, f"img-{n}", bytes([n]) * (10 + n), token=f"tok-{n}") for n in range(3)]
    first.close()

    second = Spool(tmp_path, max_bytes=1000)
    assert second.entries() == written  # every field, oldest first
    assert second.used_bytes == 10 + 11 + 12
    assert [second.read(entry) for entry in second.entries()] == [bytes([n]) * (10 + n) for n in range(3)]
    second.close()


def test_entries_survive_a_killed_process_whose_lock_is_freed_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "spool" / "gpu0@host"
    script = textwrap.dedent(
        f"""
        import os, signal
        from workers.finishing.spool import Spool
        spool = Spool({str(folder)!r}, max_bytes=10_000)
        for n in range(3):
            spool.put(image_id=f"img-{{n}}", key=f"images/s/{{n}}.png", token="dead-token", data=bytes([n]) * 100,
                      content_type="image/png")
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit: the lock is the kernel's to free
        """
    )
    process = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert process.returncode == -signal.SIGKILL
    spool = Spool(folder, max_bytes=10_000, lock_timeout=0)
    assert [entry.image_id for entry in spool.entries()] == ["img-0", "img-1", "img-2"]
    assert spool.tokens() == {"dead-token"} and spool.read(spool.entries()[2]) == b"\x02" * 100
    spool.close()


def test_one_live_process_per_folder(tmp_path: Path) -> None:
    first = Spool(tmp_path, max_bytes=1000)
    with pytest.raises(SpoolBusy, match="in use by another live process"):
        Spool(tmp_path, max_bytes=1000, lock_timeout=0.2)
    first.close()
    Spool(tmp_path, max_bytes=1000, lock_timeout=0).close()


def test_leftovers_of_a_crash_mid_write_are_removed_at_start(tmp_path: Path, caplog) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    kept = put(spool, "kept", b"k" * 10)
    spool.close()
    (tmp_path / ".img-2.abc.data.x1y2.tmp").write_bytes(b"half")  # atomic_write's temp file
    sha = hashlib.sha256(b"orphan").hexdigest()
    (tmp_path / f"img-3.{sha}.data").write_bytes(b"orphan")  # data written, sidecar not yet
    (tmp_path / "bad.json").write_text("{not json")  # a sidecar that cannot be read
    with caplog.at_level(logging.WARNING, logger="farm.worker.spool"):
        spool = Spool(tmp_path, max_bytes=1000)
    assert spool.entries() == [kept]
    assert files(tmp_path) == sorted([f"{kept.name}.data", f"{kept.name}.json"])
    assert "without its sidecar" in caplog.text and "unreadable" in caplog.text
    spool.close()


def test_a_full_spool_blocks_until_room_frees(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100)
    first = put(spool, "a", b"a" * 60)
    assert not spool.full and spool.wait_for_room(timeout=0)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (put(spool, "b", b"b" * 60), done.set()))
    thread.start()
    time.sleep(0.3)
    assert not done.is_set() and len(spool) == 1  # 60 + 60 > 100: waits
    with pytest.raises(TimeoutError):
        put(spool, "c", b"c" * 60, timeout=0.1)
    spool.remove(first)
    assert done.wait(5) and [e.image_id for e in spool.entries()] == ["b"]
    thread.join()
    put(spool, "d", b"d" * 40)  # 60 + 40: exactly full
    assert spool.full and not spool.wait_for_room(timeout=0.1)
    spool.close()


def test_an_empty_spool_admits_one_entry_bigger_than_its_bound_and_unbound_admits_all(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10)
    put(spool, "big", b"x" * 50)  # never stuck: an image larger than the bound still gets through
    assert spool.full
    spool.unbound()  # shutting down: bytes to disk rather than lost
    put(spool, "more", b"y" * 50)
    assert len(spool) == 2 and not spool.full and spool.wait_for_room(timeout=0)
    spool.close()


def test_a_file_that_no_longer_matches_its_hash_is_dropped_with_a_warning(tmp_path: Path, caplog) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    good = put(spool, "good", b"g" * 20)
    bad = put(spool, "bad", b"b" * 20)
    (tmp_path / f"{bad.name}.data").write_bytes(b"B" * 20)  # same size, other bytes: bit rot
    with caplog.at_level(logging.WARNING, logger="farm.worker.spool"), pytest.raises(CorruptEntry, match="sha256"):
        spool.read(bad)
    assert "dropping spooled image bad" in caplog.text and "rendered again" in caplog.text
    assert spool.entries() == [good] and spool.used_bytes == 20
    assert files(tmp_path) == sorted([f"{good.name}.data", f"{good.name}.json"])
    os.unlink(tmp_path / f"{good.name}.data")
    with pytest.raises(CorruptEntry, match="lost its data file"):
        spool.read(good)
    assert len(spool) == 0 and files(tmp_path) == []
    spool.close()


def test_a_truncated_file_is_dropped_when_the_spool_opens(tmp_path: Path, caplog) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    entry = put(spool, "img", b"z" * 30)
    spool.close()
    (tmp_path / f"{entry.name}.data").write_bytes(b"z" * 12)
    with caplog.at_level(logging.WARNING, logger="farm.worker.spool"):
        spool = Spool(tmp_path, max_bytes=1000)
    assert len(spool) == 0 and files(tmp_path) == [] and "12 bytes, expected 30" in caplog.text
    spool.close()


def test_a_sidecar_whose_name_does_not_match_its_hash_is_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    entry = put(spool, "img", b"q" * 8)
    spool.close()
    other = "img." + "0" * 64
    os.rename(tmp_path / f"{entry.name}.json", tmp_path / f"{other}.json")
    os.rename(tmp_path / f"{entry.name}.data", tmp_path / f"{other}.data")
    spool = Spool(tmp_path, max_bytes=1000)
    assert len(spool) == 0 and files(tmp_path) == []
    spool.close()


def test_the_same_image_and_bytes_again_replace_the_entry(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    put(spool, "img", b"same", token="old")
    put(spool, "img", b"same", token="new")
    [entry] = spool.entries()
    assert entry.token == "new" and spool.used_bytes == 4
    spool.close()
    spool = Spool(tmp_path, max_bytes=1000)
    assert [e.token for e in spool.entries()] == ["new"]
    spool.close()


def test_values_that_are_not_json_fail_before_anything_is_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    with pytest.raises(TypeError):
        put(spool, "img", b"x", values={"when": object()})
    assert files(tmp_path) == [] and spool.used_bytes == 0
    spool.close()


def test_odd_image_ids_and_worker_names_make_safe_file_names(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    entry = put(spool, "../../etc/passwd", b"x")
    assert "/" not in entry.name and (tmp_path / f"{entry.name}.data").exists()
    spool.close()
    assert spool_folder(tmp_path, "gpu0@host-1") == tmp_path / "spool" / "gpu0@host-1"
    assert spool_folder(tmp_path, "../x y") == tmp_path / "spool" / "_x_y"

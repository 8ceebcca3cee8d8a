"""Delivery under faults and what Flower sees, on PostgreSQL + Redis + S3 with two real workers."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from farm.imaging.pnginfo import read_png_metadata
from farm.db.tables import Status

pytestmark = pytest.mark.integration

LEASE = "6"


@pytest.fixture(scope="module")
def farm_env(make_farm_env):
    env = make_farm_env("servers", FARM_CLAIM_LEASE_SECONDS=LEASE, FARM_MAX_BATCH_SIZE="4")
    env.start_worker("w1")
    env.start_worker("w2")
    return env


def test_sigkilled_worker_images_are_rendered_elsewhere_and_recorded_once(farm_env, s3_env):
    farm = farm_env.farm()
    job = farm.submit("a red circle on a blue background", num_images=8, seed=100,
                      width=128, height=128, steps=40, scheduler="euler")

    # wait until some images are being rendered, then kill the process rendering them
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:
        running = [r for r in job.results() if r.status == Status.running.value]
        if running:
            victim = running[0]
        else:
            time.sleep(0.05)
    assert victim is not None, "no image started running"
    pid = int(victim.worker.rsplit("/", 1)[1])
    os.kill(pid, signal.SIGKILL)
    killed_ids = {r.id for r in job.results() if r.worker == victim.worker and r.status == Status.running.value}
    assert killed_ids

    final = job.wait(timeout=300)
    assert final.succeeded, [(r.status, r.error) for r in job.results()]
    results = {r.id: r for r in job.results()}
    assert len(results) == 8
    for image_id in killed_ids:
        result = results[image_id]
        assert result.attempts == 2, "claimed once by the killed process, once by the next"
        assert result.worker != victim.worker
        assert result.finished_at > victim.started_at
    for result in results.values():
        # the object the record points to is this image's
        _, spec = read_png_metadata(farm.storage.get(result.storage_key))
        assert spec["image_id"] == result.id
    # exactly one object per image under the submission's folders (one per key shard: images/<id[:2]>/<submission>/)
    storage = farm.storage
    prefixes = {storage.object_key(r.storage_key).rsplit("/", 1)[0] + "/" for r in results.values()}
    stored = [
        item["Key"] for prefix in prefixes
        for item in storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=prefix).get("Contents", [])
    ]
    assert sorted(stored) == sorted(storage.object_key(r.storage_key) for r in results.values())


def test_flower_sees_named_tasks_moving_through_progress(farm_env, s3_env):
    """Task events are on, the task has a readable name, and each step sends a PROGRESS event."""
    from celery.events.state import State

    farm = farm_env.farm()
    app = farm.celery
    state = State()
    seen: list[dict] = []
    ready = threading.Event()

    def listen():
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": lambda e: (seen.append(e), state.event(e))})
            ready.set()
            try:
                receiver.capture(limit=None, timeout=60, wakeup=True)
            except Exception:  # timeout ends the capture
                pass

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(10)
    time.sleep(1.0)
    job = farm.submit("a blue square on a white background", num_images=2, width=128, height=128, steps=40, seed=9)
    assert job.wait(timeout=120).succeeded
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(e["type"] == "task-succeeded" for e in seen):
        time.sleep(0.2)

    progress = [e for e in seen if e["type"] == "task-progress"]
    assert progress, f"no progress events among {sorted({e['type'] for e in seen})}"
    assert progress[-1]["step"] == progress[-1]["steps"] and progress[-1]["images"] == 2
    assert len({e["step"] for e in progress}) >= 2
    received = [e for e in seen if e["type"] == "task-received"]
    assert received and received[0]["name"] == "farm.render"
    assert received[0]["args"] == job.id  # where it came from, and what it renders, not a list of ids
    assert "'a blue square on a white background'" in received[0]["kwargs"] and "128x128" in received[0]["kwargs"]
    task = state.tasks[received[0]["uuid"]]
    assert task.name == "farm.render" and task.state == "SUCCESS"

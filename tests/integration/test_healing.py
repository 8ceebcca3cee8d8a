"""The farm heals itself against real servers: Redis restarted empty mid-run, a submitter whose
publish never happened, a worker's whole process group SIGTERMed mid-batch — every image finishes,
none twice, and nobody types an id.

Faults use a Redis of the test's own (never the machine's) on a free port, without persistence.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from farm import lifecycle
from farm.db.tables import ImageRecord
from farm.request.spec import check_request

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OwnRedis:
    """A redis-server without persistence that the test may restart empty."""

    def __init__(self, folder: Path):
        self.port = _free_port()
        self.folder = folder
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart_empty(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def own_redis(tmp_path: Path):
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def _wait_finished(farm, submission_ids: list[str], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        with farm.sessions() as session:
            counts = lifecycle.counts(session, ImageRecord.submission_id.in_(submission_ids))
        if counts["succeeded"] + counts["failed"] + counts["canceled"] == sum(counts.values()):
            return counts
        if time.monotonic() > deadline:
            return counts
        time.sleep(1)


@pytest.fixture
def healing_env(make_farm_env, own_redis):
    """A farm on the test's own Redis with a brisk reconciler; its workers stop with the test."""
    made = []

    def make(**extra):
        env = make_farm_env(
            "servers", FARM_BROKER_URL=own_redis.url, FARM_RECONCILE_INTERVAL="2", FARM_RECONCILE_GRACE_SECONDS="3",
            FARM_RECONCILE_DEEP_SECONDS="30", FARM_CLAIM_LEASE_SECONDS="10", **extra,
        )
        made.append(env)
        return env

    yield make
    for env in made:
        env.stop_workers()


def test_redis_restarted_empty_mid_run_loses_nothing(healing_env, own_redis) -> None:
    env = healing_env(FARM_MAX_BATCH_SIZE="1")
    env.start_worker("heal")
    farm = env.farm()
    job = farm.submit_many([{"prompt": f"a shape {i}", "seed": i, "steps": 6, "width": 64, "height": 64} for i in range(8)])
    deadline = time.monotonic() + 120
    while job.status().counts["succeeded"] < 1:  # the farm runs; most messages still wait in Redis
        assert time.monotonic() < deadline, job.status()
        time.sleep(0.5)

    own_redis.restart_empty()  # every queued message is gone; the database still says queued

    counts = _wait_finished(farm, [job.id], timeout=180)
    assert counts["succeeded"] == 8, (counts, env.worker_log("heal")[-3000:])
    log = env.worker_log("heal")
    assert "republished (message lost)" in log or "published from the outbox" in log, log[-3000:]
    with farm.sessions() as session:  # each image rendered and recorded once
        keys = session.scalars(select(ImageRecord.storage_key).where(ImageRecord.submission_id == job.id)).all()
    assert len(set(keys)) == 8


def test_work_recorded_by_a_submitter_that_died_before_publishing_runs(healing_env) -> None:
    env = healing_env()
    farm = env.farm()
    # exactly what a submitter killed right after its commit leaves behind: rows, no message
    specs = check_request({"prompt": "a red circle", "num_images": 3, "width": 64, "height": 64, "steps": 4},
                          farm.settings).images
    submission_id, _batches = lifecycle.record(farm.sessions, specs, num_requests=1, settings=farm.settings)
    env.start_worker("outbox")
    counts = _wait_finished(farm, [submission_id], timeout=180)
    assert counts["succeeded"] == 3, (counts, env.worker_log("outbox")[-3000:])


def test_sigterm_to_the_whole_process_group_is_a_warm_shutdown(healing_env) -> None:
    env = healing_env(FARM_SHUTDOWN_SECONDS="1", FARM_MAX_BATCH_SIZE="2")
    worker = env.start_worker("term")
    farm = env.farm()
    job = farm.submit_many([{"prompt": f"a slow shape {i}", "seed": i, "steps": 40, "width": 64, "height": 64,
                             "num_images": 2} for i in range(3)])
    deadline = time.monotonic() + 120
    while job.status().counts["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGTERM)  # systemd's default KillMode, many container inits
    worker.wait(timeout=120)
    log = env.worker_log("term")
    assert "WorkerLostError" not in log, log[-3000:]
    with farm.sessions() as session:
        attempts = session.scalar(
            select(func.max(ImageRecord.attempts)).where(
                ImageRecord.submission_id == job.id, ImageRecord.status == "queued"
            )
        )
        running = session.scalar(
            select(func.count()).where(ImageRecord.submission_id == job.id, ImageRecord.status == "running")
        )
    assert running == 0  # nothing left claimed by the stopped worker
    assert not attempts  # images handed back count no attempt

    env.workers.clear()
    env.start_worker("term2")
    counts = _wait_finished(farm, [job.id], timeout=240)
    assert counts["succeeded"] == 6, (counts, env.worker_log("term2")[-3000:])


def test_jobs_routed_to_a_worker_that_is_gone_go_back_to_the_shared_queue(healing_env, own_redis) -> None:
    import redis

    from farm.dispatch.publish import Batch, publish
    from farm.dispatch.routing import own_queue

    env = healing_env()
    farm = env.farm()
    settings = farm.settings
    gone, alive = "tiny-gpu0@scaled-away", "tiny-gpu1@here"
    client = redis.Redis.from_url(own_redis.url)
    client.set(f"{settings.queue_prefix}:adverts:tiny:{alive}", "{}", ex=60)
    publish(farm.celery, [
        Batch("t-gone", "tiny", ("a",), "x", queue=own_queue(settings, "tiny", gone), priority=6),
        Batch("t-alive", "tiny", ("b",), "x", queue=own_queue(settings, "tiny", alive)),
    ], settings, origin="test")

    result = farm.reconcile(deep=False)

    assert result.returned == 1
    shared = f"{settings.queue_for('tiny')}:6"  # the same priority, in the shared queue
    assert client.llen(shared) == 1 and client.llen(f"{own_queue(settings, 'tiny', gone)}:6") == 0
    assert client.llen(own_queue(settings, "tiny", alive)) == 1  # a live worker keeps its own

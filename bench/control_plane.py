"""Control plane at scale: N simulated GPU workers through the real worker code, against PostgreSQL,
Redis and an S3 server on this machine.

    python bench/control_plane.py [--workers 1,8,32,128] [--batch-seconds 1.3] [--seconds 20]

What is real: the Celery consumer (``app.worker_main``, the farm's poison-proof consumer and Redis
transport, task events on), the registered task ``workers.tasks.register`` → ``run_render`` (claim,
progress events, progress records, heartbeats), the ``WorkerContext`` and its ``Finisher`` (PNG
encode with A1111 metadata, S3 PUT through ``S3Storage`` and the ``Uploader``'s threads, lease
renewal, spool, ``lifecycle.record_success_many``: one record transaction per chunk), the submission (``Farm.submit_many``: records +
grouped tasks of 8). What is simulated: ``workers.diffusion.render.render_batch`` is replaced by a
sleep of ``--batch-seconds`` per chunk (spread over the steps, calling the task's ``on_step`` after
each step as diffusers does) that returns solid ``--size``² RGB images (512² by default; they
compress to ~2 KB PNGs, so bytes on the wire are far below a real render's ~400 KB).

Default per-batch time: SD1.5, 512², 25 steps, batch 8 on one H100 ≈ 1.3 s. An ESTIMATE from
published H100 SD1.5 throughput of ~6 images/s at that setting (8 / 6 ≈ 1.33 s), not a measurement.

How N workers fit on 2 cores: ``--processes`` Celery worker processes (default 2), each with
Celery's threads pool at concurrency N/P (prefetch 1 per thread, late acks). Each pool thread is one
simulated worker with its own identity (``simP.TTT@bench``: the claim's ``worker`` column, the
metrics label, its own spool folder), its own ``WorkerContext``, ``Finisher`` (uploader threads,
lease renewer) and S3 client. Shared per process, unlike production: the SQLAlchemy engine (pool
``--db-pool``; one engine per worker would need N×pool PostgreSQL connections, past this server's
``max_connections``) and the Celery consumer (one BRPOP loop per process instead of per GPU).
``Shutdown.install`` (a SIGTERM handler, main thread only) is a no-op on pool threads.

Counted, in the worker processes: database transactions (SQLAlchemy ``begin`` events), statements
(``before_cursor_execute``) and pool checkouts (each one a pre-ping round trip), Redis commands (every
command packed by redis-py, pipelines included), S3 calls (botocore ``before-call`` events on each
client), claim latency (``farm.lifecycle.claim`` wall time). Server side, for the same window: the
bench database's ``xact_commit`` (pg_stat_database) and Redis ``INFO commandstats`` (shared server:
other sessions' commands included). CPU seconds per process (``/proc/<pid>/stat``): the worker
processes, moto, the PostgreSQL backends of the bench database, redis-server, the whole machine.

Each level N: start the workers, submit a backlog (or ``--images``), wait ``--warmup`` s, measure
``--seconds`` s (images/s: rows that reached ``succeeded`` in the window), stop the workers, drop the
queue. The last line is one JSON object: ``max_images_per_s``, ``db_transactions_per_image``,
``db_transactions_per_chunk``, ``rows`` (one per N). Uses a fresh database (dropped at the end), Redis
db 15 (``--redis-url``; only this run's keys are deleted) and a ``moto_server`` it starts, unless
``--database-url``/``--s3-endpoint`` are given (the integration test passes its own).

``--prototype-fixes`` is a no-op, kept so earlier command lines still run: the two control-plane fixes
it prototyped (one record transaction per chunk, no progress rows within a short chunk) are in the
product code now (``lifecycle.record_success_many`` from the finisher, ``workers.tasks.PROGRESS_REPORT_EVERY``).
``--micro-record CHUNKS`` only compares recording per image (``lifecycle.record_success``) with
recording per chunk (``lifecycle.record_success_many``) on the database; ``--profile-dir`` samples
each worker process with py-spy during the window. Results: docs/performance.md, "Control plane at scale".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/15"
#: SD1.5, 512², 25 steps, batch 8, one H100: ~1.3 s (estimate: published ~6 images/s).
DEFAULT_BATCH_SECONDS = 1.3
MODEL = "tiny"  # any configured name: the pipeline is never loaded
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the simulated worker process -------------------------------------------------------------------

class _Stats:
    """Cumulative counters of one worker process, written to a JSON file every 0.25 s."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.redis: Counter = Counter()
        self.s3: Counter = Counter()
        self.sql: Counter = Counter()
        self.claims_file = open(path.with_suffix(".claims"), "a", buffering=1)
        self.ready = False

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def claim(self, started: float, seconds: float, images: int) -> None:
        with self.lock:
            self.counts["claims"] += 1
            if images:
                self.counts["chunks_claimed"] += 1
            self.claims_file.write(f"{started:.4f} {seconds:.6f} {images}\n")

    def write(self) -> None:
        with self.lock:
            data = {
                "t": time.time(), "pid": os.getpid(), "ready": self.ready, "counts": dict(self.counts),
                "redis": dict(self.redis), "s3": dict(self.s3), "sql": dict(self.sql),
            }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def loop(self) -> None:
        while True:
            time.sleep(0.25)
            try:
                self.write()
            except Exception:  # noqa: BLE001 - a bench counter never stops the worker
                pass


def _count_redis(stats: _Stats) -> None:
    """Count every command redis-py sends (kombu's transport uses redis-py), pipelines included."""
    from redis.connection import AbstractConnection

    pack_command, pack_commands = AbstractConnection.pack_command, AbstractConnection.pack_commands
    send_command = AbstractConnection.send_command

    def name(arg) -> str:
        return (arg.decode() if isinstance(arg, bytes) else str(arg)).split(" ")[0].upper()

    def counted_pack_command(self, *args):
        if args:
            with stats.lock:
                stats.redis[name(args[0])] += 1
        return pack_command(self, *args)

    def counted_pack_commands(self, commands):
        commands = list(commands)
        with stats.lock:
            for command in commands:
                if command:
                    stats.redis[name(command[0])] += 1
        return pack_commands(self, commands)

    def counted_send_command(self, *args, **kwargs):  # packs on its own, without pack_command
        if args:
            with stats.lock:
                stats.redis[name(args[0])] += 1
        return send_command(self, *args, **kwargs)

    AbstractConnection.pack_command = counted_pack_command
    AbstractConnection.send_command = counted_send_command
    AbstractConnection.pack_commands = counted_pack_commands


def _fake_render(batch_seconds: float):
    """``render_batch`` with the GPU replaced by a sleep: ``on_step`` after each step, solid images."""
    from PIL import Image

    from workers.diffusion.render import BatchResult, Rendered

    cache: dict = {}

    def render_batch(model, specs, *, base_scheduler_config, conditions=None, on_step=None):
        spec = specs[0]
        steps = max(1, int(spec.steps))
        started = time.perf_counter()
        interrupted = False
        for step in range(1, steps + 1):
            delay = started + batch_seconds * step / steps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if on_step is not None and not on_step(step, steps):
                interrupted = True
                break
        size = (spec.width, spec.height)
        if size not in cache:
            cache[size] = Image.new("RGB", size, (40, 90, 160))
        images = [Rendered(image=cache[size], prompt_tokens=len(s.prompt.split()), prompt_truncated=False) for s in specs]
        seconds = time.perf_counter() - started
        return BatchResult(images=images, seconds=seconds, interrupted=interrupted, phases={"denoise": seconds})

    return render_batch


class _FakeModel:
    """What the task reads of a ``LoadedModel``: name, hash, path, scheduler config (no pipeline)."""

    def __init__(self, name: str):
        self.name = name
        self.hash = "0123456789"
        self.path = Path(f"/models/{name}")
        self.scheduler_config: dict = {}
        self.pipe = None


class _ThreadContexts:
    """Looks like one ``WorkerContext`` to ``workers.tasks.register``; each pool thread gets its own
    (one simulated GPU worker per thread), taken from contexts built before the consumer starts."""

    def __init__(self, settings, contexts: list):
        object.__setattr__(self, "settings", settings)
        object.__setattr__(self, "_free", list(contexts))
        object.__setattr__(self, "_local", threading.local())
        object.__setattr__(self, "_lock", threading.Lock())

    def current(self):
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            with self._lock:
                ctx = self._free.pop(0) if self._free else None
            if ctx is None:
                raise RuntimeError("more pool threads than simulated workers")
            self._local.ctx = ctx
        return ctx

    def __getattr__(self, name):
        return getattr(self.current(), name)

    def __setattr__(self, name, value):
        setattr(self.current(), name, value)


def worker_process(args: argparse.Namespace) -> None:
    """One Celery worker process of ``--threads`` simulated workers (run by the bench, not by hand)."""
    import logging

    from celery.signals import task_prerun, worker_ready
    from sqlalchemy import create_engine, event
    from sqlalchemy.orm import sessionmaker

    import farm.lifecycle as lifecycle
    import workers.diffusion.render as render_module
    from farm.dispatch.celery_app import make_celery
    from farm.settings import Settings
    from farm.storage import open_storage
    from workers.consumption import install as install_poison_guard
    from workers.context import WorkerContext
    from workers.shutdown import Shutdown
    from workers.tasks import register

    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    stats = _Stats(Path(args.stats))
    settings = Settings()
    _count_redis(stats)

    # one engine for the process (see the module docstring), counted
    engine = create_engine(
        settings.database.replace("postgresql://", "postgresql+psycopg://", 1), pool_pre_ping=True,
        pool_size=args.db_pool, max_overflow=0, pool_timeout=120,
    )

    @event.listens_for(engine, "begin")
    def _begin(_conn):
        stats.add("db_begin")

    @event.listens_for(engine, "before_cursor_execute")
    def _statement(_conn, _cursor, statement, _params, _context, _many):
        with stats.lock:
            stats.counts["db_statements"] += 1
            stats.sql[statement.lstrip().split(None, 1)[0].upper()] += 1

    @event.listens_for(engine, "checkout")
    def _checkout(*_args):
        stats.add("db_checkouts")

    sessions = sessionmaker(engine)

    def cpu_of(step: str, function):
        """``function``, adding the calling thread's CPU seconds to ``cpu.<step>``."""

        def timed(*a, **kw):
            started = time.thread_time()
            try:
                return function(*a, **kw)
            finally:
                stats.add("cpu." + step, time.thread_time() - started)

        return timed

    claim = cpu_of("db_claim", lifecycle.claim)

    def timed_claim(*a, **kw):
        started = time.time()
        t0 = time.perf_counter()
        result = claim(*a, **kw)
        stats.claim(started, time.perf_counter() - t0, len(result.images))
        return result

    lifecycle.claim = timed_claim
    record_success = cpu_of("db_record", lifecycle.record_success)

    def counted_record_success(*a, **kw):
        recorded = record_success(*a, **kw)
        stats.add("recorded" if recorded else "record_lost")
        return recorded

    lifecycle.record_success = counted_record_success
    record_success_many = cpu_of("db_record", lifecycle.record_success_many)

    def counted_record_success_many(sessions, token, images, **kw):
        recorded = record_success_many(sessions, token, images, **kw)
        stats.add("recorded", len(recorded))
        stats.add("record_lost", len(images) - len(recorded))
        return recorded

    lifecycle.record_success_many = counted_record_success_many
    lifecycle.report_progress = cpu_of("db_progress_heartbeat", lifecycle.report_progress)
    lifecycle.heartbeat = cpu_of("db_progress_heartbeat", lifecycle.heartbeat)
    # CPU by step, per thread: the task (claim, progress, events, hand-off; minus its parts below),
    # the PNG encode, the S3 PUT (botocore), the record
    import farm.storage.s3 as s3_module
    import workers.finishing.uploader as uploader_module
    import workers.tasks as tasks_module

    uploader_module.Uploader.make = cpu_of("png_encode", uploader_module.Uploader.make)
    s3_module.S3Storage.put = cpu_of("s3_put", s3_module.S3Storage.put)
    tasks_module.run_render = cpu_of("task", tasks_module.run_render)
    render_module.render_batch = _fake_render(args.batch_seconds)

    class ThreadShutdown(Shutdown):
        def install(self) -> None:  # signal.signal works on the main thread only; the pool's are not
            pass

    def count_s3(event_name=None, **_kwargs):
        with stats.lock:
            stats.s3[event_name.split(".")[-1]] += 1

    contexts = []
    for n in range(args.threads):
        ctx = WorkerContext(settings=settings, model_name=MODEL, device="cpu", node=f"sim{args.index}.{n:03d}@bench")
        ctx._sessions = sessions
        ctx._model = _FakeModel(MODEL)
        ctx._shutdown = ThreadShutdown(settings.shutdown_seconds)
        ctx._storage = open_storage(settings)
        ctx._storage.client.meta.events.register("before-call.s3", count_s3)
        ctx.finisher  # noqa: B018 - uploader threads, spool folder: built now, not in the first task
        contexts.append(ctx)
    proxy = _ThreadContexts(settings, contexts)

    app = make_celery(settings)
    register(app, proxy)
    install_poison_guard(app, settings)

    @task_prerun.connect(weak=False)
    def _identity(task=None, **_kwargs):  # this thread's simulated worker, as the claim's `worker`
        task.request.hostname = proxy.current().node

    @worker_ready.connect(weak=False)
    def _ready(**_kwargs):
        stats.ready = True
        stats.write()

    stats.write()
    threading.Thread(target=stats.loop, daemon=True, name="bench-stats").start()
    app.worker_main([
        "worker", "--pool=threads", f"--concurrency={args.threads}", f"--queues={settings.queue_for(MODEL)}",
        f"--hostname=sim{args.index}@bench", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
        "--task-events",
    ])


# -- the bench driver --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLK_TCK, sum(values) / CLK_TCK


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="farm-cp-"))
        self.owned_db: str | None = None
        self.moto: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    # setup / teardown
    def setup(self) -> None:
        import boto3
        import redis
        from sqlalchemy import create_engine, text

        args = self.args
        database_url = args.database_url
        if not database_url:
            self.owned_db = f"farm_cp_{uuid.uuid4().hex[:8]}"
            admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{self.owned_db}"'))
            admin.dispose()
            database_url = ADMIN.rsplit("/", 1)[0] + "/" + self.owned_db
        self.database_url = database_url
        self.db_name = database_url.rsplit("/", 1)[1].split("?")[0]
        endpoint = args.s3_endpoint
        if not endpoint:
            port = _free_port()
            endpoint = f"http://127.0.0.1:{port}"
            log = open(self.tmp / "moto.log", "wb")
            self.moto = subprocess.Popen(
                [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log, stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(endpoint + "/", timeout=1).close()
                    break
                except Exception:  # noqa: BLE001
                    if time.monotonic() > deadline or self.moto.poll() is not None:
                        raise RuntimeError(f"moto_server did not start on {endpoint}")
                    time.sleep(0.2)
        self.endpoint = endpoint
        bucket = f"farm-cp-{uuid.uuid4().hex[:10]}"
        credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(credentials)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        self.redis = redis.Redis.from_url(args.redis_url)
        self.redis.ping()
        self.redis_pid = int(self.redis.info("server")["process_id"])
        self.env = {
            **credentials,
            "FARM_DATA_DIR": str(self.tmp / "data"),
            "FARM_DATABASE_URL": database_url,
            "FARM_BROKER_URL": args.redis_url,
            "FARM_STORAGE_URL": f"s3://{bucket}/renders",
            "FARM_S3_ENDPOINT_URL": endpoint,
            "FARM_DEFAULT_MODEL": MODEL,
            "FARM_UPLOAD_THREADS": str(args.upload_threads),
            "FARM_MAX_BATCH_SIZE": str(args.batch),
            "FARM_RENDER_CALIBRATE": "false",
            "HF_HUB_OFFLINE": "1",
        }
        from farm import db

        engine = db.make_engine(database_url)
        db.upgrade(engine)
        engine.dispose()

    def close(self) -> None:
        if not self.args.keep:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)  # logs, counters, spool folders
        if self.moto is not None:
            self.moto.terminate()
            try:
                self.moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.moto.kill()
        if self.owned_db and not self.args.keep:
            from sqlalchemy import create_engine, text

            admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{self.owned_db}" WITH (FORCE)'))
            admin.dispose()

    def settings(self, prefix: str):
        from farm.settings import Settings

        return Settings(**{k[5:].lower(): v for k, v in {**self.env, "FARM_QUEUE_PREFIX": prefix}.items() if k.startswith("FARM_")})

    # one level
    def run_level(self, n: int) -> dict:
        from sqlalchemy import create_engine, text

        args = self.args
        prefix = f"cp{uuid.uuid4().hex[:8]}"
        env = {**os.environ, **self.env, "FARM_QUEUE_PREFIX": prefix}
        processes = max(1, min(args.processes, n))
        threads = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
        stats_dir = self.tmp / prefix
        stats_dir.mkdir()
        workers: list[subprocess.Popen] = []
        engine = create_engine(self.database_url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            for index, count in enumerate(threads):
                log = open(stats_dir / f"worker-{index}.log", "wb")
                workers.append(subprocess.Popen(
                    [sys.executable, __file__, "--role", "worker", "--index", str(index), "--threads", str(count),
                     "--stats", str(stats_dir / f"worker-{index}.json"), "--batch-seconds", str(args.batch_seconds),
                     "--db-pool", str(args.db_pool)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                ))
            started = time.monotonic()
            while not all(self._snapshot(stats_dir, i).get("ready") for i in range(processes)):
                for index, worker in enumerate(workers):
                    if worker.poll() is not None:
                        raise RuntimeError(f"worker process {index} exited:\n" + (stats_dir / f"worker-{index}.log").read_text()[-3000:])
                if time.monotonic() - started > 300:
                    raise RuntimeError("workers not ready after 300 s")
                time.sleep(0.2)
            startup = time.monotonic() - started

            # the backlog: enough for warm-up + window at the simulated GPU rate (or --images)
            per_image = args.batch_seconds / args.batch
            backlog = args.images or min(args.max_images, int(n * (args.warmup + args.seconds + 10) / per_image))
            backlog = max(args.batch, backlog // args.batch * args.batch)
            submitted_at = time.monotonic()
            self._submit(prefix, backlog)
            submit_seconds = time.monotonic() - submitted_at

            def succeeded() -> int:
                with engine.connect() as connection:
                    return connection.execute(text("SELECT count(*) FROM images WHERE status = 'succeeded' AND submission_id IN (SELECT id FROM submissions WHERE label = :l)"), {"l": prefix}).scalar()

            if args.images:  # tiny runs: until every image is recorded
                deadline = time.monotonic() + args.timeout
                while succeeded() < backlog and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(0.6)  # the workers' counters reach their files every 0.25 s
                done = succeeded()
                first_last = self._first_last(engine, prefix)
                elapsed = max(1e-6, first_last[1] - first_last[0]) if first_last else 1e-6
                images_in_window = done
                totals = self._totals_since_start(stats_dir, processes)
                claims = self._claims(stats_dir, processes, 0.0, math.inf)
                row = self._row(n, processes, threads, backlog, startup, submit_seconds, images_in_window, elapsed, totals, claims)
                row["complete"] = done == backlog
                return row
            time.sleep(args.warmup)
            before = self._sample(stats_dir, processes, workers, engine)
            profilers = self._profile(n, workers) if args.profile_dir else []
            time.sleep(args.seconds)
            after = self._sample(stats_dir, processes, workers, engine)
            for profiler in profilers:
                try:
                    profiler.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    profiler.kill()
            window = (datetime.fromtimestamp(before["wall"], timezone.utc), datetime.fromtimestamp(after["wall"], timezone.utc))
            with engine.connect() as connection:
                images_in_window = connection.execute(
                    text("SELECT count(*) FROM images WHERE status = 'succeeded' AND finished_at >= :a AND finished_at < :b"),
                    {"a": window[0], "b": window[1]},
                ).scalar()
                left = connection.execute(text("SELECT count(*) FROM images WHERE status = 'queued'")).scalar()
            deltas = self._deltas(before, after)
            row = self._row(n, processes, threads, backlog, startup, submit_seconds, images_in_window, after["wall"] - before["wall"], deltas, self._claims(stats_dir, processes, before["wall"], after["wall"]))
            row["backlog_left"] = left
            if left == 0:
                row["warning"] = "backlog ran out inside the window: raise --max-images"
            return row
        finally:
            for worker in workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)
            for worker in workers:
                worker.wait(timeout=30)
            engine.dispose()
            self._drop_queue(prefix)

    def _profile(self, n: int, workers: list) -> list:
        """py-spy (sampling the thread that holds the GIL: Python CPU) on each worker process for the window:
        collapsed stacks in ``--profile-dir``/N<n>-worker<i>.txt."""
        import shutil

        py_spy = self.args.py_spy or shutil.which("py-spy")
        if not py_spy:
            print("--profile-dir: py-spy not found (pip install py-spy, or --py-spy PATH)", file=sys.stderr)
            return []
        folder = Path(self.args.profile_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return [
            subprocess.Popen(
                [py_spy, "record", "--pid", str(worker.pid), "--duration", str(int(self.args.seconds)), "--rate", "200",
                 "--format", "raw", "--nonblocking", "--gil", "-o", str(folder / f"N{n}-worker{i}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for i, worker in enumerate(workers)
        ]

    def _submit(self, prefix: str, images: int) -> None:
        from farm.client import Farm

        settings = self.settings(prefix)
        farm = Farm(settings)
        size = self.args.size
        requests = [
            {"prompt": f"a bench render {i}", "num_images": self.args.batch, "seed": i * 100, "steps": self.args.steps,
             "width": size, "height": size, "scheduler": "dpmpp_2m", "guidance_scale": 7.5, "model": MODEL}
            for i in range(images // self.args.batch)
        ]
        farm.submit_many(requests, label=prefix)

    # one record transaction per chunk instead of one per image
    def micro_record(self, chunks: int) -> dict:
        """Record ``chunks`` claimed chunks of ``--batch`` images three ways, on the same database:
        ``per_image`` (what the finisher does: ``lifecycle.record_success`` per image, engine as
        ``farm.db.make_engine`` makes it, pool pre-ping on), ``per_chunk`` (``lifecycle.record_success_many``:
        one ``UPDATE … FROM (VALUES …) RETURNING id`` per chunk, same engine) and ``per_chunk_no_preping``.
        Client CPU (thread time), wall, client transactions and statements, server transactions
        (pg_stat_database) and PostgreSQL backend CPU, each per image."""
        from sqlalchemy import create_engine, event, text
        from sqlalchemy.orm import sessionmaker

        from farm import db, lifecycle
        from farm.storage.keys import image_key

        batch = self.args.batch
        prefix = f"cpm{uuid.uuid4().hex[:8]}"
        self._submit(prefix, 3 * chunks * batch)
        self._drop_queue(prefix)
        url = self.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            tasks: dict[str, list[str]] = {}
            for image_id, task_id in connection.execute(text(
                "SELECT id, task_id FROM images WHERE submission_id IN (SELECT id FROM submissions WHERE label = :l) ORDER BY position"
            ), {"l": prefix}):
                tasks.setdefault(task_id, []).append(image_id)
        groups = list(tasks.values())
        variants = [
            ("per_image", db.make_engine(self.database_url), False),
            ("per_chunk", db.make_engine(self.database_url), True),
            ("per_chunk_no_preping", create_engine(url, pool_pre_ping=False), True),
        ]

        def backend_cpu() -> float:
            with admin.connect() as connection:
                pids = [r[0] for r in connection.execute(text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": self.db_name})]
            return sum(_cpu_seconds(pid) or 0.0 for pid in pids)

        def server_xacts() -> int:
            # a backend flushes its statistics when it goes idle (at most once a second) or exits:
            # read after the engines measured are disposed
            time.sleep(1.0)
            with admin.connect() as connection:
                connection.execute(text("SELECT pg_stat_clear_snapshot()"))
                return int(connection.execute(text(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"), {"d": self.db_name}).scalar())

        results = {}
        for index, (name, engine, batched) in enumerate(variants):
            claim_engine = db.make_engine(self.database_url)  # claims outside the measured engine
            claims, claim_ms = [], []
            for ids in groups[index * chunks:(index + 1) * chunks]:
                claim_started = time.perf_counter()
                claims.append(lifecycle.claim(sessionmaker(claim_engine), ids, worker="micro", lease_seconds=600, max_attempts=3))
                claim_ms.append(1000 * (time.perf_counter() - claim_started))
            claim_ms.sort()
            claim_engine.dispose()
            sessions = sessionmaker(engine)
            counts = Counter()
            event.listen(engine, "begin", lambda *_: counts.update(["tx"]))
            event.listen(engine, "before_cursor_execute", lambda *_a: counts.update(["statements"]))
            with engine.connect():
                pass  # the backend exists before the first sample
            counts.clear()
            xacts0, cpu0 = server_xacts(), backend_cpu()
            cpu_started, started = time.thread_time(), time.perf_counter()
            recorded = 0
            for claim in claims:
                values = [
                    (image.id, {"storage_key": image_key(image.submission_id, image.id), "gpu_seconds": 0.16,
                                "prompt_tokens": 5, "prompt_truncated": False, "model_path": "/models/sd15",
                                "info": {"model_hash": "0123456789", "batch_size": batch}, "flagged": False, "safety": None})
                    for image in claim.images
                ]
                if batched:
                    recorded += len(lifecycle.record_success_many(sessions, claim.token, values))
                else:
                    for image_id, v in values:
                        recorded += lifecycle.record_success(sessions, claim.token, image_id, **v)
            cpu, wall = time.thread_time() - cpu_started, time.perf_counter() - started
            cpu1 = backend_cpu()
            engine.dispose()
            xacts1 = server_xacts()
            per = max(1, recorded)
            results[name] = {
                "images": recorded,
                "client_cpu_ms_per_image": round(1000 * cpu / per, 3),
                "wall_ms_per_image": round(1000 * wall / per, 3),
                "client_transactions_per_image": round(counts["tx"] / per, 3),
                "statements_per_image": round(counts["statements"] / per, 3),
                "server_transactions_per_image": round((xacts1 - xacts0) / per, 3),
                "server_cpu_ms_per_image": round(1000 * (cpu1 - cpu0) / per, 3),
                "claim_ms_p50_alone": round(claim_ms[len(claim_ms) // 2], 2),
                "claim_ms_p99_alone": round(claim_ms[min(len(claim_ms) - 1, int(len(claim_ms) * 0.99))], 2),
            }
        admin.dispose()
        return results

    def _drop_queue(self, prefix: str) -> None:
        """Delete this level's queue, its bindings and its messages left unacked by the killed workers;
        the rest of the Redis db is left alone (``prefix`` is random)."""
        keys = list(self.redis.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            self.redis.delete(*keys)
        mine = []
        for tag, value in self.redis.hscan_iter("unacked", count=1000):
            try:
                routing_key = json.loads(value)[2]
            except (ValueError, IndexError, TypeError):
                continue
            if str(routing_key).startswith(prefix):
                mine.append(tag)
        for start in range(0, len(mine), 500):
            part = mine[start:start + 500]
            self.redis.hdel("unacked", *part)
            self.redis.zrem("unacked_index", *part)

    def _snapshot(self, stats_dir: Path, index: int) -> dict:
        try:
            return json.loads((stats_dir / f"worker-{index}.json").read_text())
        except (OSError, ValueError):
            return {}

    def _sample(self, stats_dir, processes, workers, engine) -> dict:
        from sqlalchemy import text

        with engine.connect() as connection:
            backends = [row[0] for row in connection.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": self.db_name})]
            aux = [row[0] for row in connection.execute(text("SELECT pid FROM pg_stat_activity WHERE datname IS NULL"))]
            xacts = connection.execute(
                text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"), {"d": self.db_name}).scalar()
        commandstats = self.redis.info("commandstats")
        busy, total = _machine_cpu()
        return {
            "wall": time.time(),
            "snapshots": [self._snapshot(stats_dir, i) for i in range(processes)],
            "cpu": {
                "workers": [_cpu_seconds(w.pid) for w in workers],
                "moto": _cpu_seconds(self.moto.pid) if self.moto else None,
                "redis": _cpu_seconds(self.redis_pid),
                "pg_backends": {pid: _cpu_seconds(pid) for pid in backends},
                "pg_aux": {pid: _cpu_seconds(pid) for pid in aux},
                "bench": _cpu_seconds(os.getpid()),
                "machine_busy": busy, "machine_total": total,
            },
            "pg_xacts": int(xacts or 0),
            "redis_server_calls": sum(v.get("calls", 0) for v in commandstats.values()),
            "load": Path("/proc/loadavg").read_text().split()[:3],
        }

    @staticmethod
    def _deltas(before: dict, after: dict) -> dict:
        def diff(a, b):
            return (b or 0) - (a or 0)

        counts, redis, s3, sql = Counter(), Counter(), Counter(), Counter()
        for a, b in zip(before["snapshots"], after["snapshots"]):
            for target, key in ((counts, "counts"), (redis, "redis"), (s3, "s3"), (sql, "sql")):
                for name, value in b.get(key, {}).items():
                    target[name] += value - a.get(key, {}).get(name, 0)
        ca, cb = before["cpu"], after["cpu"]
        seconds = after["wall"] - before["wall"]

        def pct(value):
            return round(100 * value / seconds, 1)

        pg = sum(diff(ca["pg_backends"].get(pid, 0), v) for pid, v in cb["pg_backends"].items() if v is not None)
        pg_aux = sum(diff(ca["pg_aux"].get(pid, 0), v) for pid, v in cb["pg_aux"].items() if v is not None)
        cpu = {
            "workers": pct(sum(diff(a, b) for a, b in zip(ca["workers"], cb["workers"]))),
            "moto_s3": pct(diff(ca["moto"], cb["moto"])) if cb["moto"] is not None else None,
            "postgres_backends": pct(pg),
            "postgres_aux": pct(pg_aux),
            "redis": pct(diff(ca["redis"], cb["redis"])),
            "bench_driver": pct(diff(ca["bench"], cb["bench"])),
            "machine": pct(diff(ca["machine_busy"], cb["machine_busy"])),
            "machine_capacity": pct(diff(ca["machine_total"], cb["machine_total"])),
        }
        return {
            "counts": counts, "redis": redis, "s3": s3, "sql": sql, "cpu_percent": cpu,
            "pg_xacts": after["pg_xacts"] - before["pg_xacts"],
            "redis_server_calls": after["redis_server_calls"] - before["redis_server_calls"],
            "load": after["load"],
        }

    def _totals_since_start(self, stats_dir, processes) -> dict:
        counts, redis, s3, sql = Counter(), Counter(), Counter(), Counter()
        for i in range(processes):
            snap = self._snapshot(stats_dir, i)
            counts.update(snap.get("counts", {}))
            redis.update(snap.get("redis", {}))
            s3.update(snap.get("s3", {}))
            sql.update(snap.get("sql", {}))
        return {"counts": counts, "redis": redis, "s3": s3, "sql": sql, "cpu_percent": None, "pg_xacts": None,
                "redis_server_calls": None, "load": Path("/proc/loadavg").read_text().split()[:3]}

    def _first_last(self, engine, prefix):
        from sqlalchemy import text

        with engine.connect() as connection:
            row = connection.execute(text(
                "SELECT min(started_at), max(finished_at) FROM images WHERE submission_id IN (SELECT id FROM submissions WHERE label = :l)"
            ), {"l": prefix}).one()
        if row[0] is None or row[1] is None:
            return None
        return row[0].timestamp(), row[1].timestamp()

    def _claims(self, stats_dir, processes, start, end) -> list[float]:
        latencies = []
        for i in range(processes):
            try:
                lines = (stats_dir / f"worker-{i}.claims").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                parts = line.split()
                if len(parts) == 3 and start <= float(parts[0]) < end:
                    latencies.append(float(parts[1]))
        return latencies

    @staticmethod
    def _cpu_steps(counts, per, d, seconds) -> dict:
        """Worker processes' CPU ms per image, by step (thread CPU time), the rest as ``other``
        (Celery's consumer and pool bookkeeping, events, lease renewal, thread switches)."""
        steps = {k[4:]: 1000 * v / per for k, v in counts.items() if k.startswith("cpu.")}
        inner = sum(steps.get(k, 0.0) for k in ("db_claim", "db_progress_heartbeat"))
        if "task" in steps:  # the task's own CPU, without the database steps it calls
            steps["task"] = max(0.0, steps["task"] - inner)
        out = {k: round(v, 2) for k, v in sorted(steps.items())}
        if d.get("cpu_percent"):
            total = d["cpu_percent"]["workers"] / 100 * seconds * 1000 / per
            out["total"] = round(total, 2)
            out["other"] = round(max(0.0, total - sum(steps.values())), 2)
        return out

    def _row(self, n, processes, threads, backlog, startup, submit_seconds, images, seconds, d, claims) -> dict:
        counts = d["counts"]
        per = max(1, counts.get("recorded", 0))
        chunks = max(1, counts.get("chunks_claimed", 0))
        row = {
            "workers": n,
            "processes": processes,
            "images_per_s": round(images / seconds, 1),
            "gpu_bound_images_per_s": round(n * self.args.batch / self.args.batch_seconds, 1),
            "images": images,
            "seconds": round(seconds, 1),
            "recorded": counts.get("recorded", 0),
            "chunks": counts.get("chunks_claimed", 0),
            "db_transactions_per_image": round(counts.get("db_begin", 0) / per, 2),
            "db_transactions_per_chunk": round(counts.get("db_begin", 0) / chunks, 2),
            "db_statements_per_image": round(counts.get("db_statements", 0) / per, 2),
            "db_checkouts_per_image": round(counts.get("db_checkouts", 0) / per, 2),
            "sql_per_image": {k: round(v / per, 2) for k, v in sorted(d["sql"].items())},
            "redis_commands_per_image": round(sum(d["redis"].values()) / per, 2),
            "redis_by_command_per_image": {k: round(v / per, 2) for k, v in d["redis"].most_common(12)},
            "worker_cpu_ms_per_image": self._cpu_steps(counts, per, d, seconds),
            "s3_put_per_s": round(d["s3"].get("PutObject", 0) / seconds, 1),
            "s3_calls_per_image": {k: round(v / per, 2) for k, v in sorted(d["s3"].items())},
            "load": d["load"],
            "startup_s": round(startup, 1),
            "backlog": backlog,
            "submit_s": round(submit_seconds, 2),
        }
        if d["pg_xacts"] is not None:
            row["pg_server_xacts_per_image"] = round(d["pg_xacts"] / per, 2)
            row["redis_server_calls_per_image"] = round(d["redis_server_calls"] / per, 2)
            row["cpu_percent"] = d["cpu_percent"]
        if claims:
            claims.sort()
            row["claim_ms_p50"] = round(1000 * claims[len(claims) // 2], 1)
            row["claim_ms_p99"] = round(1000 * claims[min(len(claims) - 1, int(len(claims) * 0.99))], 1)
            row["claims_in_window"] = len(claims)
        if d["cpu_percent"]:
            cpu = d["cpu_percent"]
            parts = {k: v for k, v in cpu.items() if k not in ("machine", "machine_capacity") and v is not None}
            top = max(parts, key=parts.get)
            capacity = cpu["machine_capacity"] or 200.0
            row["saturated"] = (
                f"machine CPU {cpu['machine']:.0f}% of {capacity:.0f}%; biggest: {top} {parts[top]:.0f}%"
                + ("" if row["images_per_s"] < 0.9 * row["gpu_bound_images_per_s"] else " (GPU-bound: the simulated GPUs limit)")
            )
        return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,8,32,128", help="simulated GPU workers per level, comma-separated")
    parser.add_argument("--batch-seconds", type=float, default=DEFAULT_BATCH_SECONDS,
                        help="seconds one GPU batch takes (default 1.3: SD1.5 512² 25 steps batch 8 on an H100, estimated)")
    parser.add_argument("--batch", type=int, default=8, help="images per task (FARM_MAX_BATCH_SIZE)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512, help="side of the solid PNGs (and of the requests)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per level")
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds after submitting before the window")
    parser.add_argument("--processes", type=int, default=2, help="Celery worker processes the workers are spread over")
    parser.add_argument("--upload-threads", type=int, default=4, help="FARM_UPLOAD_THREADS per simulated worker")
    parser.add_argument("--db-pool", type=int, default=20, help="PostgreSQL connections per worker process")
    parser.add_argument("--max-images", type=int, default=40000, help="largest backlog per level")
    parser.add_argument("--images", type=int, default=0, help="a fixed number of images per level, run to the end (tests)")
    parser.add_argument("--timeout", type=float, default=300.0, help="with --images: give up after this many seconds")
    parser.add_argument("--database-url", default="", help="an existing, empty database (default: a fresh one, dropped after)")
    parser.add_argument("--redis-url", default=REDIS)
    parser.add_argument("--s3-endpoint", default="", help="an S3 endpoint (default: a moto_server started here)")
    parser.add_argument("--keep", action="store_true", help="keep the fresh database and the run's temporary folder")
    parser.add_argument("--prototype-fixes", action="store_true",
                        help="no-op (kept for earlier command lines): its fixes are in the product code now")
    parser.add_argument("--micro-record", type=int, default=0, metavar="CHUNKS",
                        help="only compare recording CHUNKS chunks per image vs per chunk (record_success_many), then exit")
    parser.add_argument("--profile-dir", default="", help="py-spy each worker process during the window (collapsed stacks here)")
    parser.add_argument("--py-spy", default="", help="the py-spy binary (default: on PATH)")
    # worker-process role (internal)
    parser.add_argument("--role", default="bench", choices=["bench", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--stats", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "worker":
        worker_process(args)
        return

    bench = Bench(args)
    if args.micro_record:
        try:
            bench.setup()
            results = bench.micro_record(args.micro_record)
        finally:
            bench.close()
        for name, row in results.items():
            print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        print(json.dumps({"micro_record": results, "batch": args.batch, "load": Path("/proc/loadavg").read_text().split()[:3]}))
        return
    levels = [int(n) for n in args.workers.split(",") if n.strip()]
    rows = []
    started = time.monotonic()
    try:
        bench.setup()
        for n in levels:
            row = bench.run_level(n)
            rows.append(row)
            print(
                f"N={n}: {row['images_per_s']} images/s (GPU-bound {row['gpu_bound_images_per_s']}), "
                f"db {row['db_transactions_per_image']} tx/image ({row['db_transactions_per_chunk']}/chunk), "
                f"{row['db_statements_per_image']} statements/image, redis {row['redis_commands_per_image']} cmd/image, "
                f"S3 {row['s3_put_per_s']} PUT/s, claim p50 {row.get('claim_ms_p50')} ms p99 {row.get('claim_ms_p99')} ms, "
                f"load {' '.join(row['load'])}; {row.get('saturated', '')}",
                flush=True,
            )
            print("  " + json.dumps(row), flush=True)
    finally:
        bench.close()
    best = max(rows, key=lambda r: r["images_per_s"]) if rows else {}
    print(json.dumps({
        "max_images_per_s": best.get("images_per_s", 0.0),
        "at_workers": best.get("workers"),
        "db_transactions_per_image": best.get("db_transactions_per_image"),
        "db_transactions_per_chunk": best.get("db_transactions_per_chunk"),
        "batch_seconds": args.batch_seconds,
        "batch": args.batch,
        "image_size": args.size,
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
    }))


if __name__ == "__main__":
    main()

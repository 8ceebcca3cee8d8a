"""Cross-job batching (``FARM_TOP_UP``): many single-image jobs, with and without topping up, in one run.

    python bench/cross_job.py [--jobs 256] [--submitters 32] [--workers 2] [--steps 10] [--size 64]

Each phase gets a fresh PostgreSQL database (127.0.0.1:5432), its own queues in Redis (db 13) and
``--workers`` real ``farm worker --cpu`` processes on the tiny model (one torch thread each), started
and ready before anything is submitted. Then ``--submitters`` threads, each with its own
``farm.Farm``, submit ``--jobs`` single-image jobs between them (same model, size, steps, scheduler and
guidance; their own prompts and seeds) as fast as they can, and the phase ends when every image has
succeeded. Phase one: ``FARM_TOP_UP=1`` (the default); phase two: ``FARM_TOP_UP=0`` (the behaviour
before: one task, one job).

Figures per phase: images/s from the first submit to the last image recorded; ``mean_batch``, the
mean GPU chunk (images / chunks, from each image's recorded ``info.batch_size``); latency from
submit to recorded (p50/p95). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, select, text

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/13"
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a green square on a red background", "a blue cross on a yellow background",
           "a yellow triangle on a green background"]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pick(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def phase(args, top_up: bool, data_dir: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from farm.client import Farm
    from farm.db.tables import ImageRecord
    from farm.settings import Settings

    name = f"farm_bench_xj_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    prefix = f"benchxj{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "FARM_DATA_DIR": str(data_dir), "FARM_DATABASE_URL": url,
        "FARM_BROKER_URL": REDIS, "FARM_MODELS": "tiny=builtin:tiny", "FARM_DEFAULT_MODEL": "tiny",
        "FARM_QUEUE_PREFIX": prefix, "FARM_TORCH_THREADS": "1", "FARM_TOP_UP": "1" if top_up else "0",
        "FARM_MAX_BATCH_SIZE": str(args.max_batch), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }
    settings = Settings(**{k[5:].lower(): v for k, v in env.items() if k.startswith("FARM_")})
    processes: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        subprocess.run([sys.executable, "-m", "farm", "db", "upgrade"], env=env, check=True, capture_output=True)
        for i in range(args.workers):
            logs.append(data_dir / f"{prefix}-worker{i}.log")
            with open(logs[-1], "wb") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "farm", "worker", "--cpu", "--name", f"xj{i}@bench"],
                    env={**env, "FARM_WORKER_METRICS_PORT": str(_port())}, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                ))
        for process, path in zip(processes, logs):
            deadline = time.monotonic() + 300
            while b" ready." not in path.read_bytes():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(path.read_text(errors="replace")[-3000:])
                time.sleep(0.2)

        farms = [Farm(settings) for _ in range(args.submitters)]
        per = [args.jobs // args.submitters + (i < args.jobs % args.submitters) for i in range(args.submitters)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(args.submitters + 1)

        def submitter(n: int) -> None:
            barrier.wait()
            try:
                for k in range(per[n]):
                    farms[n].submit(PROMPTS[(n + k) % len(PROMPTS)], seed=1000 * n + k, steps=args.steps,
                                    width=args.size, height=args.size, guidance_scale=5, scheduler="dpmpp_2m", model="tiny")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=submitter, args=(n,)) for n in range(args.submitters)]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        load_before = os.getloadavg()[0]
        for thread in threads:
            thread.join()
        submitted = time.perf_counter() - started
        if errors:
            raise SystemExit(f"submit failed: {errors[0]!r}")
        engine = create_engine(url)
        deadline = time.monotonic() + args.timeout
        while True:
            with engine.connect() as connection:
                done = connection.execute(
                    text("SELECT count(*) FROM images WHERE status IN ('succeeded', 'failed', 'canceled')")
                ).scalar()
            if done >= args.jobs:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {done} of {args.jobs} images finished in {args.timeout} s")
            time.sleep(0.05)
        wall = time.perf_counter() - started
        with engine.connect() as connection:
            rows = connection.execute(
                select(ImageRecord.status, ImageRecord.info, ImageRecord.queued_at, ImageRecord.finished_at)
            ).all()
        engine.dispose()
        for farm in farms:
            farm.close()
        sizes = [row.info["batch_size"] for row in rows if row.status == "succeeded"]
        chunks = sum(1 / size for size in sizes)
        latency = [(row.finished_at - row.queued_at).total_seconds() for row in rows if row.finished_at]
        topped_up = sum(path.read_text(errors="replace").count("topped up with") for path in logs)
        return {
            "images": len(rows), "succeeded": len(sizes), "seconds": round(wall, 2), "submit_seconds": round(submitted, 2),
            "images_per_s": round(len(sizes) / wall, 2), "mean_batch": round(len(sizes) / chunks, 2) if chunks else 0,
            "latency_p50_s": round(statistics.median(latency), 2), "latency_p95_s": round(_pick(latency, 0.95), 2),
            "tasks_topped_up": topped_up, "loadavg_1m": round(load_before, 2),
        }
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        import redis

        client = redis.Redis.from_url(REDIS)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=256, help="single-image submissions")
    parser.add_argument("--submitters", type=int, default=32, help="concurrent submitting threads")
    parser.add_argument("--workers", type=int, default=2, help="farm worker --cpu processes (one torch thread each)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8, help="FARM_MAX_BATCH_SIZE: the top-up target on CPU")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="farm-xj-bench-"))
    with_top_up = phase(args, True, data_dir)
    print("top-up:   ", json.dumps(with_top_up), flush=True)
    without = phase(args, False, data_dir)
    print("without:  ", json.dumps(without), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "jobs": args.jobs, "submitters": args.submitters, "workers": args.workers, "steps": args.steps, "size": args.size,
        "images_per_s": with_top_up["images_per_s"], "images_per_s_without": without["images_per_s"],
        "speedup": round(with_top_up["images_per_s"] / without["images_per_s"], 2) if without["images_per_s"] else None,
        "mean_batch": with_top_up["mean_batch"], "mean_batch_without": without["mean_batch"],
        "latency_p50_s": with_top_up["latency_p50_s"], "latency_p50_s_without": without["latency_p50_s"],
        "latency_p95_s": with_top_up["latency_p95_s"], "latency_p95_s_without": without["latency_p95_s"],
        "tasks_topped_up": with_top_up["tasks_topped_up"], "cpus": os.cpu_count(),
        "loadavg_1m": [with_top_up["loadavg_1m"], without["loadavg_1m"]], "commit": commit,
    }))


if __name__ == "__main__":
    main()

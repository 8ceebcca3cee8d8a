"""`farm api` under load: N concurrent synchronous /sdapi/v1/txt2img requests on loopback, rendered
by real CPU workers (the tiny model), against local PostgreSQL + Redis (file storage).

    python bench/api_load.py [--requests 200] [--workers 1] [--steps 2] [--size 64]

Two measures, in one run, on a fresh database and Redis db 13 (removed afterwards):

1. accept: N concurrent ``POST /v1/jobs`` (validated, recorded, published, owner recorded): the API's
   own overhead, submit → accepted, without waiting for a render (those jobs are canceled at once);
2. sync: N concurrent ``POST /sdapi/v1/txt2img`` (one 64×64 image each), each answering with its
   base64 PNG once a worker rendered it: end-to-end latency and throughput.

Prints, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/13"
ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "p50": round(statistics.median(ordered), 4), "p95": round(pick(0.95), 4), "p99": round(pick(0.99), 4),
        "max": round(ordered[-1], 4),
    }


async def _fire(client: httpx.AsyncClient, n: int, method: str, path: str, body: dict) -> tuple[list[float], list, float, list]:
    async def one(i: int):
        started = time.perf_counter()
        answer = await client.request(method, path, json={**body, "seed": i + 1})
        return time.perf_counter() - started, answer

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    wall = time.perf_counter() - started
    times = [r[0] for r in results if not isinstance(r, BaseException) and r[1].status_code in (200, 201)]
    bad = [repr(r)[:200] if isinstance(r, BaseException) else f"{r[1].status_code} {r[1].text[:200]}"
           for r in results if isinstance(r, BaseException) or r[1].status_code not in (200, 201)]
    return times, bad, wall, [r[1] for r in results if not isinstance(r, BaseException)]


async def _run(base: str, key: str, args) -> dict:
    body = {"prompt": "a red cube", "steps": args.steps, "width": args.size, "height": args.size}
    limits = httpx.Limits(max_connections=args.requests + 10, max_keepalive_connections=args.requests + 10)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=args.timeout,
                                 limits=limits) as client:
        sequential = []
        for i in range(args.sequential):
            started = time.perf_counter()
            answer = await client.post("/v1/jobs", json={**body, "model": "tiny", "seed": 10_000 + i})
            sequential.append(time.perf_counter() - started)
            await client.delete(f"/v1/jobs/{answer.json()['id']}")
        accept_times, accept_bad, accept_wall, answers = await _fire(client, args.requests, "POST", "/v1/jobs",
                                                                     {**body, "model": "tiny"})
        await asyncio.gather(*(client.delete(f"/v1/jobs/{a.json()['id']}") for a in answers if a.status_code == 201))
        sync_times, sync_bad, sync_wall, answers = await _fire(
            client, args.requests, "POST", "/sdapi/v1/txt2img", {**body, "sampler_name": "DPM++ 2M"})
        images = sum(len(a.json().get("images", [])) for a in answers if a.status_code == 200)
    return {
        "accept_sequential_s": _stats(sequential), "accept_s": _stats(accept_times), "accept_per_s": round(len(accept_times) / accept_wall, 1),
        "accept_errors": len(accept_bad), "sync_s": _stats(sync_times), "sync_wall_s": round(sync_wall, 1),
        "sync_images": images, "sync_images_per_s": round(images / sync_wall, 2), "sync_errors": len(sync_bad),
        "error_examples": (accept_bad + sync_bad)[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="CPU worker processes")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--sequential", type=int, default=20, help="accepts timed one at a time (API) and direct (Farm.submit_many)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from farm.api import keys
    from farm.api.config import ApiSettings
    from farm.client import Farm
    from farm.settings import Settings

    name = f"farm_bench_api_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    tmp = Path(tempfile.mkdtemp(prefix="farm-api-bench-"))
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "FARM_DATA_DIR": str(tmp / "data"),
        "FARM_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", "FARM_BROKER_URL": REDIS,
        "FARM_MODELS": "tiny=builtin:tiny", "FARM_DEFAULT_MODEL": "tiny", "FARM_QUEUE_PREFIX": f"bench{uuid.uuid4().hex[:6]}",
        "FARM_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "FARM_WORKER_METRICS_PORT": str(_port()), "FARM_API_SYNC_TIMEOUT": str(args.timeout),
    }
    processes: list[subprocess.Popen] = []
    try:
        subprocess.run([sys.executable, "-m", "farm", "db", "upgrade"], env=env, check=True, capture_output=True)
        with Farm(Settings(**{k[5:].lower(): v for k, v in env.items() if k.startswith("FARM_") and "__" not in k and not k.startswith("FARM_API_")})) as farm:
            _, key = keys.create(farm.sessions, "bench")
            direct = []
            for i in range(args.sequential + 1):  # the first one warms the connections up
                started = time.perf_counter()
                farm.submit_many([{"prompt": "a red cube", "steps": args.steps, "width": args.size, "height": args.size,
                                   "seed": 20_000 + i}]).cancel()
                direct.append(time.perf_counter() - started)
            direct_submit = _stats(direct[1:])
        for i in range(args.workers):
            log = open(tmp / f"worker{i}.log", "wb")
            worker_env = {**env, "FARM_WORKER_METRICS_PORT": str(_port())}
            processes.append(subprocess.Popen([sys.executable, "-m", "farm", "worker", "--cpu", "--name", f"bench{i}@bench"],
                                              env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            deadline = time.monotonic() + 300
            while b" ready." not in (tmp / f"worker{i}.log").read_bytes():
                if processes[-1].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((tmp / f"worker{i}.log").read_text(errors="replace")[-3000:])
                time.sleep(0.2)
        port = _port()
        log = open(tmp / "api.log", "wb")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "farm.api.serve:app", "--factory", "--port", str(port), "--log-level", os.environ.get("BENCH_API_LOG_LEVEL", "warning"),
             "--timeout-keep-alive", str(int(ApiSettings().keep_alive))]  # as `farm api` runs it,
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit((tmp / "api.log").read_text(errors="replace"))
                time.sleep(0.2)
        result = asyncio.run(_run(base, key, args))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        print(json.dumps({"requests": args.requests, "workers": args.workers, "steps": args.steps, "size": args.size,
                          "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "direct_submit_and_cancel_s": direct_submit, **result, "commit": commit}))
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
        import redis

        redis.Redis.from_url(REDIS).flushdb()


if __name__ == "__main__":
    main()

"""Cross-job batching (``FARM_TOP_UP``): many single-image jobs, with and without topping up, in one run.

    python bench/cross_job.py [--jobs 256] [--submitters 32] [--workers 2] [--steps 10] [--size 64]
    python bench/cross_job.py --embedded [--jobs 64 --submitters 8]          # no servers (SQLite, files)
    python bench/cross_job.py --embedded --device cuda --full-size --jobs 64 --submitters 16
                                   # SD1.5 architecture, random fp16 weights, 512², 25 steps, CFG 7.5

Each phase gets a fresh PostgreSQL database (127.0.0.1:5432), its own queues in Redis (db 13) and
``--workers`` real ``farm worker --cpu`` processes on the tiny model (one torch thread each), started
and ready before anything is submitted. ``--embedded``: instead, a fresh data folder per phase with the
farm's embedded defaults (no ``FARM_DATABASE_URL``/``FARM_BROKER_URL``/``FARM_STORAGE_URL``: SQLite, kombu's
filesystem broker, ``file://`` storage), as ``farm demo`` runs. ``--device cuda``: one ``farm worker --gpus
all`` (one process per GPU, fp16) instead of the CPU workers. ``--full-size``: the full-size SD1.5
architecture with random weights, built once by ``bench/gpu.py``'s ``build_sd15`` and saved as a diffusers
folder (``--model DIR``, reused when it is there), 512², 25 steps, DPM++ 2M, CFG 7.5 unless given. Then ``--submitters`` threads, each with its own
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
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
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


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:  # refused while starting; HTTPError (503) while loading
        return False


def _pick(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def phase(args, top_up: bool, data_dir: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from farm.client import Farm
    from farm.db.tables import ImageRecord
    from farm.settings import Settings

    phase_started = time.perf_counter()
    name = f"farm_bench_xj_{uuid.uuid4().hex[:8]}"
    prefix = f"benchxj{uuid.uuid4().hex[:6]}"
    cuda = args.device.startswith("cuda")
    env = {
        k: v for k, v in os.environ.items()
        if not (args.embedded and k in ("FARM_DATABASE_URL", "FARM_BROKER_URL", "FARM_STORAGE_URL"))
    }
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "FARM_DATA_DIR": str(data_dir), "FARM_MODELS": f"{args.model_name}={args.model_location}",
        "FARM_DEFAULT_MODEL": args.model_name, "FARM_QUEUE_PREFIX": prefix, "FARM_TOP_UP": "1" if top_up else "0",
        "FARM_MAX_BATCH_SIZE": str(args.max_batch), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    if not cuda:
        env["FARM_TORCH_THREADS"] = "1"
    if args.embedded and args.broker_poll is not None:
        # kombu's virtual transports sleep polling_interval (1 s) whenever a poll finds nothing the worker
        # may take, so the embedded broker hands a worker about one message a second: with single-image
        # tasks (and the no-op messages of topped-up images) both phases would measure that, not the GPU.
        # The workers' processes (the supervisor's children too: they inherit PYTHONPATH) get a
        # sitecustomize that sets it; the farm's own code is unchanged.
        hook = data_dir.parent / "bench-site"
        hook.mkdir(parents=True, exist_ok=True)
        (hook / "sitecustomize.py").write_text(
            "import os\n"
            "if os.environ.get('FARM_BENCH_BROKER_POLL'):\n"
            "    from kombu.transport.virtual import base\n"
            "    base.Transport.polling_interval = float(os.environ['FARM_BENCH_BROKER_POLL'])\n"
        )
        env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
        env["FARM_BENCH_BROKER_POLL"] = str(args.broker_poll)
    if args.embedded:
        url = f"sqlite:///{data_dir / 'farm.db'}"  # what Settings.database gives with no FARM_DATABASE_URL
        admin = None
    else:
        admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        env.update({"FARM_DATABASE_URL": url, "FARM_BROKER_URL": REDIS})
    settings = Settings(**{k[5:].lower(): v for k, v in env.items() if k.startswith("FARM_")})
    assert settings.database == url, (settings.database, url)
    processes: list[subprocess.Popen] = []
    logs: list[Path] = []
    tag = "top-up" if top_up else "without"
    try:
        subprocess.run([sys.executable, "-m", "farm", "db", "upgrade"], env=env, check=True, capture_output=True)
        if cuda:  # one farm worker: one process per GPU (the supervisor's slots), fp16
            commands = [["--gpus", args.gpus, "--name", "xj@bench"]]
        else:
            commands = [["--cpu", "--name", f"xj{i}@bench"] for i in range(args.workers)]
        ports = []
        for i, command in enumerate(commands):
            logs.append(args.log_dir / f"xj-{tag}-worker{i}.log")
            ports.append(_port())
            with open(logs[-1], "wb") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "farm", "worker", *command],
                    env={**env, "FARM_WORKER_METRICS_PORT": str(ports[-1])}, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                ))
        # Ready = the supervisor's /readyz answers 200: every process has its model loaded, warmed up and
        # calibrated (Celery's "… ready." comes before that, and the first task would pay for it)
        for process, path, port in zip(processes, logs, ports):
            deadline = time.monotonic() + args.ready_timeout
            while not _ready(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"worker not ready ({path}):\n" + path.read_text(errors="replace")[-3000:])
                time.sleep(0.2)
        ready_seconds = time.perf_counter() - phase_started

        farms = [Farm(settings) for _ in range(args.submitters)]
        per = [args.jobs // args.submitters + (i < args.jobs % args.submitters) for i in range(args.submitters)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(args.submitters + 1)

        def submitter(n: int) -> None:
            barrier.wait()
            try:
                for k in range(per[n]):
                    farms[n].submit(PROMPTS[(n + k) % len(PROMPTS)], seed=1000 * n + k, steps=args.steps,
                                    width=args.size, height=args.size, guidance_scale=args.guidance,
                                    scheduler=args.scheduler, model=args.model_name)
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
            "tasks_topped_up": topped_up, "loadavg_1m": round(load_before, 2), "ready_seconds": round(ready_seconds, 1),
        }
    finally:
        for process in processes:  # the supervisor alone: it stops its workers warmly (a group SIGTERM
            if process.poll() is None:  # would also hit Celery's pool children mid-task)
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its session
            except ProcessLookupError:
                pass
        if admin is None:  # embedded: the phase's data folder (database, broker, images) goes; logs stay
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
            import redis

            client = redis.Redis.from_url(REDIS)
            for key in client.scan_iter(f"{prefix}*"):
                client.delete(key)


def build_model(folder: Path, device: str) -> float:
    """The full-size SD1.5 architecture with random weights (``bench/gpu.py``'s ``build_sd15``: one set of
    configs), built on ``device``, saved as an fp16 diffusers folder (safetensors) for ``FARM_MODELS`` (a CPU
    worker loads it as fp32). Seconds taken."""
    started = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.gpu import build_sd15

    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    pipe = build_sd15(device, torch.float16)
    pipe.save_pretrained(building, safe_serialization=True)  # fp16 files, 2.1 GB
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    building.rename(folder)
    return time.perf_counter() - started


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=256, help="single-image submissions")
    parser.add_argument("--submitters", type=int, default=32, help="concurrent submitting threads")
    parser.add_argument("--workers", type=int, default=2, help="farm worker --cpu processes (one torch thread each)")
    parser.add_argument("--steps", type=int, help="denoising steps (10; 25 with --full-size)")
    parser.add_argument("--size", type=int, help="image side in px (64; 512 with --full-size)")
    parser.add_argument("--guidance", type=float, help="CFG scale (5; 7.5 with --full-size)")
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--max-batch", type=int, default=8, help="FARM_MAX_BATCH_SIZE: the top-up target")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a phase may take to finish its images")
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds a worker may take to be ready")
    parser.add_argument("--embedded", action="store_true",
                        help="no servers: SQLite, the filesystem broker and file storage (the farm's embedded defaults)")
    parser.add_argument("--broker-poll", type=float, default=None,
                        help="with --embedded: the workers' filesystem-broker polling interval in s (kombu's 1 s unless given)")
    parser.add_argument("--device", default="cpu", help="cpu (farm worker --cpu × --workers) or cuda (farm worker --gpus)")
    parser.add_argument("--gpus", default="all", help="with --device cuda: farm worker --gpus (one process per GPU)")
    parser.add_argument("--full-size", action="store_true",
                        help="the full-size SD1.5 architecture, random weights (bench/gpu.py's builder) instead of tiny")
    parser.add_argument("--model", type=Path, help="with --full-size: its diffusers folder, built there if missing")
    parser.add_argument("--build-only", action="store_true", help="with --full-size: build the --model folder, then exit")
    parser.add_argument("--log-dir", type=Path, help="where the workers' logs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    full = args.full_size
    args.steps = args.steps or (25 if full else 10)
    args.size = args.size or (512 if full else 64)
    args.guidance = args.guidance if args.guidance is not None else (7.5 if full else 5.0)
    if (args.model or args.build_only) and not full:
        parser.error("--model and --build-only go with --full-size")
    if args.device.startswith("cuda") and not (args.embedded or args.build_only):
        parser.error("--device cuda goes with --embedded")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    # `timeout` (bench/gpu_run.sh) sends SIGTERM: unwind, so each phase's finally stops its workers
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    base = Path(tempfile.mkdtemp(prefix="farm-xj-bench-"))
    args.log_dir = (args.log_dir or base).resolve()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    args.gpu_count = 0
    build_seconds = None
    if args.full_size:
        args.model = (args.model or base / "sd15-random").resolve()
        if not (args.model / "model_index.json").exists():
            build_seconds = round(build_model(args.model, args.device), 1)
            print(f"built {args.model} in {build_seconds} s", flush=True)
        if args.build_only:
            report = {"model": str(args.model), "build_seconds": build_seconds}
            print(json.dumps(report), flush=True)
            return report
        args.model_name, args.model_location = "sd15", str(args.model)
    else:
        args.model_name, args.model_location = "tiny", "builtin:tiny"
    if args.device.startswith("cuda"):
        sys.path.insert(0, str(ROOT))
        from farm.supervisor import detect_gpus

        args.gpu_count = len(detect_gpus()) if args.gpus == "all" else len([g for g in args.gpus.split(",") if g.strip()])
        args.workers = args.gpu_count

    if args.embedded:  # a fresh data folder per phase: new SQLite database, broker folder and images
        with_top_up = phase(args, True, base / "top-up")
    else:
        with_top_up = phase(args, True, base)
    print("top-up:   ", json.dumps(with_top_up), flush=True)
    without = phase(args, False, base / "without" if args.embedded else base)
    print("without:  ", json.dumps(without), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {
        "jobs": args.jobs, "submitters": args.submitters, "workers": args.workers, "steps": args.steps, "size": args.size,
        "images_per_s": with_top_up["images_per_s"], "images_per_s_without": without["images_per_s"],
        "speedup": round(with_top_up["images_per_s"] / without["images_per_s"], 2) if without["images_per_s"] else None,
        "mean_batch": with_top_up["mean_batch"], "mean_batch_without": without["mean_batch"],
        "latency_p50_s": with_top_up["latency_p50_s"], "latency_p50_s_without": without["latency_p50_s"],
        "latency_p95_s": with_top_up["latency_p95_s"], "latency_p95_s_without": without["latency_p95_s"],
        "tasks_topped_up": with_top_up["tasks_topped_up"], "cpus": os.cpu_count(),
        "loadavg_1m": [with_top_up["loadavg_1m"], without["loadavg_1m"]], "commit": commit,
    }
    if args.embedded or args.device != "cpu" or args.full_size:  # the PostgreSQL line keeps its keys as in docs
        report.update({
            "mode": "embedded" if args.embedded else "postgresql", "device": args.device,
            "model": "sd15-architecture-random" if args.full_size else "builtin:tiny", "guidance": args.guidance,
            "scheduler": args.scheduler, "max_batch": args.max_batch, "build_seconds": build_seconds,
            "broker_poll_s": args.broker_poll if args.embedded else None,
            "ready_seconds": [with_top_up["ready_seconds"], without["ready_seconds"]],
        })
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()

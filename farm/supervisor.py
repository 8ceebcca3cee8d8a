"""``farm worker``: one worker process per GPU, each pinned to its device, plus the reconciler.

Light on purpose (no torch): it only counts GPUs, starts ``python -m workers.main`` once per GPU
with ``CUDA_VISIBLE_DEVICES`` set in that process's environment, restarts a process that dies, and
runs the reconciler (``farm.reconciler``): images of a worker that died holding them, work recorded
and never published, messages the broker lost — all queued again with no person involved.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from farm.errors import ConfigError
from farm.settings import Settings

log = logging.getLogger("farm.launcher")

#: A worker process that ran this long before exiting restarts at once (its back-off starts over);
#: one that keeps dying sooner waits 1, 2, 4 … 60 s between starts.
STABLE_SECONDS = 300


@dataclass
class Slot:
    name: str
    device: str
    visible: str | None  # CUDA_VISIBLE_DEVICES for this process; None on CPU
    process: subprocess.Popen | None = None
    restarts: int = 0  # restarts in a row (reset once the process has run STABLE_SECONDS)
    started: float = 0.0  # time.monotonic() of its last start
    restart_at: float | None = None  # when it is due to start again after exiting
    restarts_total: int = 0  # every restart of this slot (farm_worker_restarts_total)


def detect_gpus() -> list[str]:
    """GPU indices from ``nvidia-smi`` (no CUDA initialised here)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(
            f"cannot list GPUs with nvidia-smi ({exc}); pass --gpus 0,1,… or use --cpu"
        ) from exc
    return [line.strip() for line in out.splitlines() if line.strip()]


def plan_slots(gpus: str, *, cpu: bool, name: str | None, count: int = 1, model: str | None = None) -> list[Slot]:
    """One slot per GPU (or CPU process), named ``<model>-gpu<N>@host`` (``<model>-cpu@host``) so workers
    of two models on one host never share a name; ``name`` overrides (``node@host``)."""
    host = socket.gethostname()
    tag = f"{model}-" if model else ""
    if cpu:
        base = name or f"{tag}cpu@{host}"
        if count == 1:
            return [Slot(name=base, device="cpu", visible="")]
        node, _, at = base.partition("@")
        return [Slot(name=f"{node}{i}@{at or host}", device="cpu", visible="") for i in range(count)]
    indices = detect_gpus() if gpus == "all" else [g.strip() for g in gpus.split(",") if g.strip()]
    if not indices:
        raise ConfigError(f"no GPU to use (--gpus {gpus!r}); pass --cpu to render on the CPU")
    for index in indices:
        if not index.isdigit():
            raise ConfigError(f"--gpus {gpus!r}: {index!r} is not a GPU index; use 'all' or e.g. '0,1'")
    prefix = name.split("@")[0] if name else f"{tag}gpu"
    return [Slot(name=f"{prefix}{i}@{host}", device="cuda", visible=i) for i in indices]


def run(settings: Settings, *, model: str, slots: list[Slot], sweep: bool = True, loglevel: str = "INFO") -> int:
    """Start every slot's process, keep them running, stop them all on SIGINT/SIGTERM."""
    if model not in settings.models:
        raise ConfigError(f"model {model!r} is not in FARM_MODELS ({', '.join(sorted(settings.models))})")
    stopping = threading.Event()
    metrics_dir = _metrics_folder(settings)

    def start(slot: Slot) -> None:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        if slot.visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.visible
        cmd = [sys.executable, "-m", "workers.main", "--model", model, "--device", slot.device, "--name", slot.name, "--loglevel", loglevel]
        slot.process = subprocess.Popen(cmd, env=env)
        slot.started, slot.restart_at = time.monotonic(), None
        log.info("started %s (pid %d) for model %s on %s", slot.name, slot.process.pid, model, slot.device)

    def stop(signum, _frame) -> None:
        stopping.set()
        for slot in slots:
            if slot.process and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    locks = [_lock_name(settings, slot.name) for slot in slots]  # refuses a name already running here
    server = _serve_metrics(settings, metrics_dir, slots)
    for slot in slots:
        start(slot)
    if sweep:
        threading.Thread(target=_reconcile, args=(settings, stopping), daemon=True, name="reconciler").start()

    while not stopping.is_set():
        now = time.monotonic()
        for slot in slots:  # each slot backs off on its own: one crashing GPU never delays another
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    slot.restarts_total += 1
                    start(slot)
                continue
            code = slot.process.poll() if slot.process else None
            if code is not None:
                if now - slot.started >= STABLE_SECONDS:  # it ran fine for a while: not a crash loop
                    slot.restarts = 0
                slot.restarts += 1
                delay = min(60, 2 ** (slot.restarts - 1))
                log.warning("%s exited with %s; restarting in %d s", slot.name, code, delay)
                slot.restart_at = now + delay
        stopping.wait(1.0)
    for slot in slots:
        if slot.process:
            try:
                slot.process.wait(timeout=settings.shutdown_seconds + 180)
            except subprocess.TimeoutExpired:
                slot.process.kill()
    if server is not None:
        server.shutdown()
    for lock in locks:
        lock.close()
    return 0


def _lock_name(settings: Settings, name: str):
    """Hold ``<data_dir>/locks/<name>.lock`` for as long as this supervisor runs: a second worker
    with the same name on this host (it would shadow the first in Flower) refuses to start."""
    import fcntl

    folder = settings.data_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / f"{name}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"a worker named {name!r} already runs on this host (FARM_DATA_DIR {settings.data_dir}); "
            "give this one another --name"
        ) from None
    return handle


def _metrics_folder(settings: Settings):
    """A fresh folder for this supervisor's processes' metric files (prometheus-client multiprocess)."""
    import shutil

    folder = settings.data_dir / "metrics" / str(os.getpid())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _serve_metrics(settings: Settings, folder, slots: list[Slot]):
    """Serve every render process's metrics (``workers.metrics``) and ``farm_worker_up`` on
    ``FARM_WORKER_METRICS_PORT`` at ``/metrics``, and ``/readyz`` (200 once every process has its model
    loaded, else 503: a readiness probe); None when off or the port is taken (logged, never fatal)."""
    if settings.worker_metrics_port is None:
        return None
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector

    class Up:
        def collect(self):
            up = GaugeMetricFamily("farm_worker_up", "1 while the worker's process runs", labels=["worker"])
            restarts = CounterMetricFamily("farm_worker_restarts", "Times farm worker restarted the process", labels=["worker"])
            for slot in slots:
                up.add_metric([slot.name], 1 if slot.process is not None and slot.process.poll() is None else 0)
                restarts.add_metric([slot.name], slot.restarts_total)
            yield up
            yield restarts

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    registry.register(Up())
    metrics_app = make_wsgi_app(registry)

    def ready() -> bool:
        loaded = {s.labels.get("worker") for m in registry.collect() if m.name == "farm_worker_ready"
                  for s in m.samples if s.value >= 1}
        return all(slot.name in loaded and slot.process is not None and slot.process.poll() is None for slot in slots)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/readyz":
            ok = ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ready\n" if ok else b"loading\n"]
        return metrics_app(environ, start_response)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # scrapes every few seconds: not a log line each
            pass

    try:
        server = make_server(settings.worker_metrics_host, settings.worker_metrics_port, app, handler_class=Quiet)
    except OSError as exc:
        log.warning("worker metrics not served on port %d: %s", settings.worker_metrics_port, exc)
        return None
    threading.Thread(target=server.serve_forever, daemon=True, name="worker-metrics").start()
    log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port)
    return server


def _reconcile(settings: Settings, stopping: threading.Event) -> None:
    """The reconciler (``farm.reconciler``): expired leases, the outbox, messages the broker lost.
    Every supervisor runs one; one leads at a time. The database may be away when this starts."""
    from farm.reconciler import Reconciler
    from farm.services import Services

    services = None
    while services is None:
        try:
            services = Services.open(settings)
        except Exception as exc:  # noqa: BLE001 - the database is away: try again
            log.warning("reconciler waits for the database: %s", type(exc).__name__)
            if stopping.wait(settings.reconcile_interval):
                return
    try:
        Reconciler(services).run(stopping)
    finally:
        services.close()

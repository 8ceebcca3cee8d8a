"""A worker's Prometheus metrics (prometheus-client, multiprocess mode).

Each render process writes its samples to files under ``PROMETHEUS_MULTIPROC_DIR`` (set by ``farm
worker``'s supervisor for its children, one folder per supervisor, emptied at start); the supervisor
serves them all on ``FARM_WORKER_METRICS_PORT`` (``farm.supervisor``), labelled by worker.

==========================================  ==============================================================
``farm_worker_images_total{worker,outcome}``  images rendered / failed / handed back
``farm_worker_failures_total{worker,reason}`` failed images by reason class (``farm.failures``)
``farm_worker_phase_seconds{worker,phase}``   seconds by phase: queue_wait (per image), claim, inputs, lora,
                                              text_encode, denoise, vae_decode, png_encode, upload,
                                              record (histogram)
``farm_worker_chunk_images{worker}``          images rendered at once (histogram)
``farm_worker_lora_loads_total{worker,level}`` adapters served from the pipeline (cache), the worker's
                                              disk, or storage
``farm_worker_gpu_memory_bytes{worker}``      peak GPU memory of the last chunk (CUDA only)
``farm_worker_gpu_utilization_percent{worker}`` GPU utilisation after the last chunk (NVML, when installed)
``farm_worker_uploads_pending{worker}``       chunks handed to the finisher, not finished
``farm_spool_bytes{worker}``                  rendered PNGs waiting for storage in the local spool
``farm_spool_limit_bytes{worker}``            the spool's bound (``FARM_SPOOL_BYTES``)
``farm_worker_ready{worker}``                 1 once the process has its model loaded (``/readyz``)
``farm_worker_training_step{worker,job,model}``  the running training job's step (``job`` = its name)
``farm_worker_training_total_steps{worker,job,model}``  its total steps
``farm_worker_training_loss{worker,job,model}``  its last step's loss
``farm_worker_training_eta_seconds{worker,job,model}``  its estimated seconds to finish (0 once ended)
``farm_worker_training_running{worker,job,model}``  1 while this process trains the job, 0 once it ended
                                              or stopped (canceled / taken over)
==========================================  ==============================================================

Nothing here may fail a task: every update is guarded.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["WorkerMetrics"]

log = logging.getLogger("farm.worker")

_PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

IMAGES = Counter("farm_worker_images", "Images by outcome", ["worker", "outcome"])
FAILURES = Counter("farm_worker_failures", "Failed images by reason class", ["worker", "reason"])
PHASE = Histogram("farm_worker_phase_seconds", "Seconds per chunk by phase", ["worker", "phase"], buckets=_PHASE_BUCKETS)
CHUNK = Histogram("farm_worker_chunk_images", "Images rendered at once", ["worker"], buckets=(1, 2, 4, 8, 16, 32, 64))
LORA = Counter("farm_worker_lora_loads", "LoRA adapters served, by level", ["worker", "level"])
GPU_MEMORY = Gauge("farm_worker_gpu_memory_bytes", "Peak GPU memory of the last chunk", ["worker"], multiprocess_mode="liveall")
GPU_UTILIZATION = Gauge("farm_worker_gpu_utilization_percent", "GPU utilisation (NVML) after the last chunk", ["worker"], multiprocess_mode="liveall")
PENDING = Gauge("farm_worker_uploads_pending", "Chunks handed off, not finished", ["worker"], multiprocess_mode="liveall")
READY = Gauge("farm_worker_ready", "1 once the process has its model loaded", ["worker"], multiprocess_mode="liveall")
SPOOL_LIMIT = Gauge("farm_spool_limit_bytes", "The spool's bound (FARM_SPOOL_BYTES)", ["worker"], multiprocess_mode="liveall")
_TRAINING = ["worker", "job", "model"]
# liveall: one series per live process (a pid label), dropped when the supervisor marks it dead
TRAINING_STEP = Gauge("farm_worker_training_step", "The running training job's step", _TRAINING, multiprocess_mode="liveall")
TRAINING_TOTAL = Gauge("farm_worker_training_total_steps", "The running training job's total steps", _TRAINING, multiprocess_mode="liveall")
TRAINING_LOSS = Gauge("farm_worker_training_loss", "The running training job's last loss", _TRAINING, multiprocess_mode="liveall")
TRAINING_ETA = Gauge("farm_worker_training_eta_seconds", "The running training job's estimated seconds to finish", _TRAINING, multiprocess_mode="liveall")
TRAINING_RUNNING = Gauge("farm_worker_training_running", "1 while this process trains the job", _TRAINING, multiprocess_mode="liveall")
SPOOL = Gauge("farm_spool_bytes", "Bytes waiting for storage in the spool", ["worker"], multiprocess_mode="liveall")


class WorkerMetrics:
    """The metrics of one worker (its Celery node name is the ``worker`` label)."""

    def __init__(self, worker: str):
        self.worker = worker

    def images(self, outcome: str, count: int = 1) -> None:
        _guard(lambda: IMAGES.labels(self.worker, outcome).inc(count))

    def failed(self, error: str, count: int = 1) -> None:
        from farm.failures import reason_class

        def update() -> None:
            IMAGES.labels(self.worker, "failed").inc(count)
            FAILURES.labels(self.worker, reason_class(error)).inc(count)

        _guard(update)

    def phase(self, name: str, seconds: float) -> None:
        _guard(lambda: PHASE.labels(self.worker, name).observe(seconds))

    def queue_wait(self, queued_at) -> None:
        """Seconds each claimed image waited since it was queued (the ``queue_wait`` phase)."""
        def update() -> None:
            from farm.db.tables import utcnow

            now = utcnow()
            for when in queued_at:
                if when is not None:
                    PHASE.labels(self.worker, "queue_wait").observe(max(0.0, (now - when).total_seconds()))

        _guard(update)

    def chunk(self, images: int) -> None:
        _guard(lambda: CHUNK.labels(self.worker).observe(images))

    def lora(self, level: str) -> None:
        _guard(lambda: LORA.labels(self.worker, level).inc())

    def gpu_memory(self, device) -> None:
        def update() -> None:
            import torch

            if str(device).startswith("cuda") and torch.cuda.is_available():
                GPU_MEMORY.labels(self.worker).set(torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
                try:  # NVML (pynvml / nvidia-ml-py) when installed
                    GPU_UTILIZATION.labels(self.worker).set(torch.cuda.utilization())
                except Exception:  # noqa: BLE001 - no NVML: memory only
                    pass

        _guard(update)

    def ready(self) -> None:
        _guard(lambda: READY.labels(self.worker).set(1))

    def finisher(self, pending: int, spool_bytes: int, spool_limit: int | None = None) -> None:
        def update() -> None:
            PENDING.labels(self.worker).set(pending)
            SPOOL.labels(self.worker).set(spool_bytes)
            if spool_limit is not None:
                SPOOL_LIMIT.labels(self.worker).set(spool_limit)

        _guard(update)

    def training(self, job: str, model: str, *, step: int, total: int, loss: float | None = None,
                 eta: float | None = None, running: bool = True) -> None:
        """The training job this process runs: its step, total, loss and ETA (``running=False`` once it
        ended or stopped: ETA 0, the last step kept)."""
        def update() -> None:
            labels = (self.worker, job, model)
            TRAINING_STEP.labels(*labels).set(step)
            TRAINING_TOTAL.labels(*labels).set(total)
            if loss is not None:
                TRAINING_LOSS.labels(*labels).set(loss)
            if eta is not None or not running:
                TRAINING_ETA.labels(*labels).set(0 if not running else eta)
            TRAINING_RUNNING.labels(*labels).set(1 if running else 0)

        _guard(update)


def _guard(update) -> None:
    try:
        update()
    except Exception:  # noqa: BLE001 - metrics never fail a task
        log.debug("metric not updated", exc_info=True)

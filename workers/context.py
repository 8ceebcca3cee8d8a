"""What one worker process holds: its settings, its model (loaded once, warmed up), its connections,
its caches and its finisher. Built by ``workers.main`` before the pool forks; everything heavy is
made lazily, in the pool process (``after_fork``), never before the fork.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from farm import lifecycle
from farm.errors import ModelLoadError
from farm.settings import Settings

log = logging.getLogger("farm.worker")


@dataclass
class WorkerContext:
    """What one worker process holds: its settings, its model (loaded once) and its connections."""

    settings: Settings
    model_name: str
    device: str
    node: str = "worker"  # the Celery node name, e.g. gpu0@host
    _sessions: Any = None
    _storage: Any = None
    _model: Any = None
    _inputs: Any = None
    _lora_files: Any = None
    _embedding_files: Any = None
    _adapters: Any = None
    _finisher: Any = None
    _safety: Any = None
    _batch_plan: Any = None
    _shutdown: Any = None
    _metrics: Any = None
    #: the thread renewing this worker's advert, and what stops it (``close``)
    _advert_keeper: Any = None
    _advert_stop: Any = field(default_factory=threading.Event)
    #: ``(count, error)`` of the images the running task failed (``workers.tasks``)
    task_failures: list = None  # type: ignore[assignment]

    @property
    def metrics(self):
        """This worker's Prometheus metrics (``workers.metrics``)."""
        if self._metrics is None:
            from workers.metrics import WorkerMetrics

            self._metrics = WorkerMetrics(self.node)
        return self._metrics

    def report_finisher(self) -> None:
        """Uploads pending and spooled bytes, for the metrics."""
        finisher = self._finisher
        if finisher is not None:
            spool = getattr(finisher, "spool", None)
            self.metrics.finisher(
                finisher.pending, spool.used_bytes if spool is not None else 0,
                spool.max_bytes if spool is not None else None,
            )

    @property
    def shutdown(self):
        """SIGTERM in this render process (``workers.shutdown``): finish the chunk or hand back."""
        if self._shutdown is None:
            from workers.shutdown import Shutdown

            self._shutdown = Shutdown(self.settings.shutdown_seconds)
        return self._shutdown

    @property
    def sessions(self):
        if self._sessions is None:
            from farm import db

            self._sessions = db.make_sessionmaker(db.make_engine(self.settings.database))
        return self._sessions

    @property
    def storage(self):
        if self._storage is None:
            from farm.storage import open_storage

            self._storage = open_storage(self.settings)
        return self._storage

    @property
    def inputs(self):
        if self._inputs is None:
            from workers.input_cache import InputCache

            self._inputs = InputCache(self.storage, self.settings.data_dir / "cache" / "inputs")
        return self._inputs

    @property
    def lora_files(self):
        if self._lora_files is None:
            from workers.lora.disk_cache import LoraDiskCache

            self._lora_files = LoraDiskCache(
                self.storage,
                self.settings.data_dir / "cache" / "loras",
                max_bytes=self.settings.lora_cache_bytes,
                min_free_bytes=self.settings.lora_min_free_bytes,
            )
        return self._lora_files

    @property
    def adapters(self):
        if self._adapters is None:
            from workers.lora.adapters import AdapterSet

            from workers.diffusion.speed import unfuse_qkv

            # Fused q/k/v projections (workers.diffusion.speed) would bypass the LoRA layers peft adds to
            # to_q/to_k/to_v: go back to separate projections before the first adapter loads.
            if unfuse_qkv(self.model.pipe):
                log.info("unfused q/k/v projections: this worker serves LoRAs")
            self._adapters = AdapterSet(self.model.pipe, max_loaded=self.settings.lora_max_loaded)
        return self._adapters

    @property
    def finisher(self):
        """Encodes, uploads and records rendered chunks on threads while the GPU renders on; images
        storage cannot take yet wait in this worker's spool (``workers.finishing.spool``)."""
        if self._finisher is None:
            from workers.finishing.finisher import build_finisher

            self._finisher = build_finisher(
                self.settings, self.storage, worker=self.node, record=self._record, adopt=self._adopt, renew=self._renew,
            )
            self._finisher.observe = self.metrics.phase
            self._finisher.screen = self.safety
            self._finisher.fail = self._fail_image
        return self._finisher

    @property
    def safety(self):
        """The safety check each image gets before it is stored (``workers.finishing.safety``): its
        checker (FARM_SAFETY_CHECKER, or one that says it is absent) is loaded once, on first need."""
        if self._safety is None:
            from workers.finishing.safety import Screen, load_checker

            screen = Screen(lambda: load_checker(self.settings.safety_checker, device=self.device))

            def check(body: bytes):
                screened = screen(body)
                if screened.values.get("flagged"):  # farm_worker_images_total{outcome="flagged"/"filtered"}
                    self.metrics.images("filtered" if screened.filtered else "flagged")
                return screened

            check.screen = screen
            self._safety = check
        return self._safety

    def _fail_image(self, token: str, image_id: str, error: str) -> bool:
        """Fail one image of a claim for good (its safety check cannot run on this worker)."""
        from farm.retrying import until_deadline

        failed = until_deadline(
            lambda: lifecycle.record_failure(self.sessions, token, [image_id], error),
            deadline_seconds=self.settings.infra_deadline_seconds, what="record a failed image",
        )
        if failed:
            self.metrics.failed(error, failed)
        return bool(failed)

    def _record(self, token: str, image_id: str, key: str, values) -> bool:
        """Record a stored image; a database outage is waited out (FARM_INFRA_DEADLINE_SECONDS)."""
        from farm.retrying import until_deadline

        started = time.perf_counter()
        recorded = until_deadline(
            lambda: lifecycle.record_success(self.sessions, token, image_id, storage_key=key, **values),
            deadline_seconds=self.settings.infra_deadline_seconds, what="record an image",
        )
        self.metrics.phase("record", time.perf_counter() - started)
        return recorded

    def _adopt(self, token: str, image_id: str, key: str, values) -> bool:
        """Record a spooled image, also one an earlier process of this worker left (if nobody rendered
        it since: ``farm.lifecycle.record_success(adopt=True)``)."""
        from farm.retrying import until_deadline

        return until_deadline(
            lambda: lifecycle.record_success(self.sessions, token, image_id, adopt=True, storage_key=key, **values),
            deadline_seconds=self.settings.infra_deadline_seconds, what="record a spooled image",
        )

    def _renew(self, tokens) -> None:
        """Renew the leases of images waiting for storage; best-effort (a blip is retried next time)."""
        from farm.retrying import is_infrastructure

        for token in tokens:
            try:
                lifecycle.heartbeat(self.sessions, token, self.settings.claim_lease_seconds)
            except Exception as exc:  # noqa: BLE001
                if not is_infrastructure(exc):
                    raise
                log.warning("lease renewal skipped: %s", type(exc).__name__)
                return

    @property
    def batch_plan(self):
        """Images rendered at once per size (configured, measured, or learned from out-of-memory)."""
        if self._batch_plan is None:
            from workers.diffusion.batching import BatchPlan

            self._batch_plan = BatchPlan(self.settings.batch_sizes)
        return self._batch_plan

    @property
    def model(self):
        if self._model is None:
            from workers.diffusion.pipeline import load_pipeline

            location = self.settings.models[self.model_name]
            started = time.perf_counter()
            settings = self.settings
            self._model = load_pipeline(
                self.model_name, location, models_dir=settings.models_dir, device=self.device,
                speed={
                    "channels_last": settings.render_channels_last,
                    "fuse_qkv": settings.render_fuse_qkv,
                    "vae_slicing": settings.render_vae_slicing,
                    "compile": settings.render_compile,
                    "compile_mode": settings.render_compile_mode,
                },
            )
            log.info(
                "loaded model %s from %s on %s in %.1f s",
                self.model_name,
                self._model.path,
                self.device,
                time.perf_counter() - started,
            )
            self._attach_text_caches(self._model)
        return self._model

    def _attach_text_caches(self, model) -> None:
        """The prompt-embedding cache and the textual-inversion embeddings of this worker's model."""
        from workers.diffusion.embeddings import EmbeddingStore
        from workers.diffusion.prompts import PromptCache

        size = self.settings.prompt_cache_bytes
        model.prompt_cache = PromptCache(max_bytes=size) if size > 0 else None
        model.embeddings = EmbeddingStore(model.pipe, fetch=self._embedding_bytes)

    def _embedding_bytes(self, sha256: str) -> bytes:
        """An embedding file by sha256: the on-disk cache (verified when written), else storage."""
        from farm.storage.keys import content_key

        if self._embedding_files is None:
            from workers.lora.disk_cache import LoraDiskCache

            self._embedding_files = LoraDiskCache(
                self.storage, self.settings.data_dir / "cache" / "embeddings",
                max_bytes=1024**3, min_free_bytes=self.settings.lora_min_free_bytes,
            )
        path, _ = self._embedding_files.path(sha256, content_key("embeddings", sha256, "safetensors"))
        return path.read_bytes()

    def after_fork(self) -> None:
        """In a fresh pool process: drop inherited connections, load the pipeline once, warm it up."""
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        self._sessions = None
        self._storage = None
        self._inputs = None
        self._lora_files = None
        self._embedding_files = None
        self._finisher = None
        self._safety = None
        self._batch_plan = None
        # images an earlier process of this worker rendered and spooled (storage was away): they
        # upload while the model loads, and are recorded, not rendered again
        self.finisher.drain_spool(timeout=0)
        try:
            self.model  # noqa: B018 - load now, not inside the first task
            self.warm_up()
        except ModelLoadError:
            # Keep serving: each task then fails its images with this reason instead of the pool
            # process dying and respawning in a loop.
            log.exception("model %s could not be loaded", self.model_name)
            return
        if self.settings.safety_checker is not None:  # load it now, not inside the first upload
            self.safety.screen.checker  # noqa: B018
        self.finisher.drain_spool(timeout=60)
        self.metrics.ready()
        self.advertise()
        self._keep_advertising()

    def warm_up(self) -> None:
        """Compile the warm-up sizes (with ``render_compile``) and measure their best batch sizes
        (``render_calibrate``; on CUDA by default), before the first task."""
        settings = self.settings
        sizes = settings.warmup_sizes
        batches = range(1, settings.max_batch_size + 1)
        if settings.render_compile:
            from workers.diffusion.speed import warmup

            warmup(self._model.pipe, sizes, batches)
        calibrate = settings.render_calibrate
        if calibrate is None:
            calibrate = str(self.device).startswith("cuda")
        unmeasured = [size for size in sizes if size not in settings.batch_sizes]
        if calibrate and unmeasured:
            from workers.diffusion.batching import BatchPlan, calibrate_pipeline

            measured = calibrate_pipeline(self._model, unmeasured, settings.max_batch_size, cache_dir=settings.data_dir / "cache")
            self._batch_plan = BatchPlan({**measured, **settings.batch_sizes})
            log.info("batch sizes: %s", self._batch_plan.as_dict())
            capped = {f"{w}x{h}": n for (w, h), n in measured.items() if n >= settings.max_batch_size}
            if capped:
                log.warning(
                    "best batch reached FARM_MAX_BATCH_SIZE=%d at %s: tasks carry at most that many images; "
                    "raise it on the submitters and workers to try larger chunks",
                    settings.max_batch_size, capped,
                )
        if settings.render_compile:
            from workers.diffusion.speed import freeze_compiled_shapes

            freeze_compiled_shapes()

    def close(self, timeout: float | None = None) -> None:
        """At process exit: finish the uploads handed off (their images are recorded, not redone)."""
        self._advert_stop.set()
        if self._finisher is not None:
            self._finisher.close(timeout=timeout)

    def _keep_advertising(self) -> None:
        """Renew the advert every third of ``advert_ttl`` while this process lives (a daemon thread):
        a killed worker's advert then lapses within ``advert_ttl``, so LoRA jobs stop being routed to
        its own queue (and the reconciler moves what is there back to the shared queue)."""
        if self._advert_keeper is not None:
            return
        period = max(1.0, self.settings.advert_ttl / 3)

        def renew() -> None:
            while not self._advert_stop.wait(period):
                self.advertise()

        self._advert_keeper = threading.Thread(target=renew, name="farm-advert", daemon=True)
        self._advert_keeper.start()

    def advertise(self) -> None:
        """Tell submitters which adapters this worker holds (affinity routing); never fails a task."""
        from farm.dispatch.routing import advertise

        try:
            loaded = self._adapters.loaded() if self._adapters is not None else []
            advertise(self.settings, model=self.model_name, node=self.node, loras=loaded)
        except Exception:  # Redis hiccup: routing falls back to the shared queue
            log.debug("could not advertise adapters", exc_info=True)

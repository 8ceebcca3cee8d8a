"""Farm-wide Prometheus metrics, read from the database and the broker at each scrape: ``farm exporter``.

Workers export their own (``workers.metrics``: images rendered, seconds by phase, GPU memory…); this
exporter says what only the whole farm knows, for dashboards, alerts and autoscaling:

==================================  ======================================================================
``farm_queue_depth{model}``         messages waiting in the broker for a model: every priority sub-queue
                                    (``<prefix>.<model>:N``) and warm workers' own queues counted — what
                                    an autoscaler should scale on (a plain list length misses most)
``farm_messages_unacked{model}``    messages delivered to a worker and not yet acknowledged
``farm_images{model,status}``       images by status (queued, paused, running, succeeded, failed, canceled)
``farm_images_failed{reason}``      failed images by reason class (``farm.failures``)
``farm_oldest_queued_seconds{model}``  age of the oldest queued image (0 when none)
``farm_campaign_images{campaign,status}``  unfinished campaigns' images by status
``farm_campaign_eta_seconds{campaign}``    their estimated time to finish at the last 10 minutes' rate
``farm_dead_letters_total{queue,reason}``  poison messages dead-lettered since the farm began
                                    (``farm dead-letters list``; ``farm.dispatch.dead_letters``)
``farm_reconciler_lease_expiry_timestamp_seconds``  when the reconciler's lease runs out (a stale
                                    value: no reconciler runs)
``farm_training_jobs{model,state}``  LoRA training jobs by state (queued, running, succeeded, failed,
                                    canceled)
``farm_training_step{job,model}``   each running training job's recorded step (``job`` = its name; the
                                    row's value, renewed by its worker's heartbeat about every second)
``farm_training_total_steps{job,model}``  its total steps
``farm_training_loss{job,model}``   its last recorded loss
``farm_training_eta_seconds{job,model}``  its worker's estimate of the seconds left (when known)
``farm_up{component}``              1 when the database / broker answered this scrape, else 0
==================================  ======================================================================

Each scrape costs a few aggregate queries; results are kept ``cache_seconds`` (default 10) so many
scrapers cost the database the same as one.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from farm.db.tables import (
    CampaignRecord, CampaignState, ImageRecord, LeaseRecord, Status, TrainingJobRecord, TrainingState, utcnow,
)
from farm.failures import summarize
from farm.services import Services

__all__ = ["FarmCollector", "queue_depths", "serve"]

log = logging.getLogger("farm.exporter")

#: Seconds of finished images a campaign's ETA is computed over.
RATE_WINDOW_SECONDS = 600


class FarmCollector(Collector):
    def __init__(self, services: Services, *, cache_seconds: float = 10.0):
        self.services = services
        self.cache_seconds = cache_seconds
        self._cached: tuple[float, list] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_seconds:
                self._cached = (now, list(self._measure()))
            return iter(self._cached[1])

    def _measure(self) -> Iterable[GaugeMetricFamily]:
        up = GaugeMetricFamily("farm_up", "1 when the component answered this scrape", labels=["component"])
        try:
            yield from self._database_metrics()
            up.add_metric(["database"], 1)
        except Exception as exc:  # noqa: BLE001 - an outage is a metric, not a crash
            log.warning("database: %s", type(exc).__name__)
            up.add_metric(["database"], 0)
        try:
            yield from self._broker_metrics()
            up.add_metric(["broker"], 1)
        except Exception as exc:  # noqa: BLE001
            log.warning("broker: %s", type(exc).__name__)
            up.add_metric(["broker"], 0)
        yield up

    # -- the database -----------------------------------------------------------------------------
    def _database_metrics(self) -> Iterable[GaugeMetricFamily]:
        images = GaugeMetricFamily("farm_images", "Images by model and status", labels=["model", "status"])
        failed = GaugeMetricFamily("farm_images_failed", "Failed images by reason class", labels=["reason"])
        oldest = GaugeMetricFamily("farm_oldest_queued_seconds", "Age of the oldest queued image", labels=["model"])
        campaign_images = GaugeMetricFamily(
            "farm_campaign_images", "Unfinished campaigns' images by status", labels=["campaign", "status"]
        )
        campaign_eta = GaugeMetricFamily(
            "farm_campaign_eta_seconds", "Estimated seconds for a campaign to finish (recent rate)", labels=["campaign"]
        )
        now = utcnow()
        with self.services.sessions() as session:
            by_model = session.execute(
                select(ImageRecord.model, ImageRecord.status, func.count()).group_by(ImageRecord.model, ImageRecord.status)
            ).all()
            models = sorted({model for model, _, _ in by_model} | set(self.services.settings.models))
            found = {(model, status): count for model, status, count in by_model}
            for model in models:
                for status in Status:
                    images.add_metric([model, status.value], found.get((model, status.value), 0))
            for reason, (count, _example) in sorted(summarize(session).items()):
                failed.add_metric([reason], count)
            first = dict(
                session.execute(
                    select(ImageRecord.model, func.min(ImageRecord.queued_at))
                    .where(ImageRecord.status == Status.queued.value)
                    .group_by(ImageRecord.model)
                ).all()
            )
            for model in models:
                since = first.get(model)
                oldest.add_metric([model], max(0.0, (now - since).total_seconds()) if since else 0.0)
            campaigns = session.execute(
                select(CampaignRecord.id, CampaignRecord.name).where(CampaignRecord.state != CampaignState.canceled.value)
            ).all()
            window = now - timedelta(seconds=RATE_WINDOW_SECONDS)
            for campaign_id, name in campaigns:
                counts = dict(
                    session.execute(
                        select(ImageRecord.status, func.count())
                        .where(ImageRecord.campaign_id == campaign_id)
                        .group_by(ImageRecord.status)
                    ).all()
                )
                remaining = sum(counts.get(s, 0) for s in ("queued", "running", "paused"))
                if not remaining:
                    continue  # finished campaigns drop out of the series
                for status in Status:
                    campaign_images.add_metric([name, status.value], counts.get(status.value, 0))
                recent = session.scalar(
                    select(func.count()).where(
                        ImageRecord.campaign_id == campaign_id,
                        ImageRecord.status == Status.succeeded.value,
                        ImageRecord.finished_at >= window,
                    )
                )
                if recent:
                    campaign_eta.add_metric([name], remaining / (recent / RATE_WINDOW_SECONDS))
            lease = GaugeMetricFamily(
                "farm_reconciler_lease_expiry_timestamp_seconds",
                "When the reconciler's leader lease runs out (Unix time); its leader renews it every round",
            )
            expiry = session.scalar(
                select(func.max(LeaseRecord.expires_at)).where(LeaseRecord.name.like("reconciler:%"))
            )
            if expiry is not None:
                lease.add_metric([], expiry.timestamp())
        return [images, failed, oldest, campaign_images, campaign_eta, lease, *self._training_metrics(models)]

    def _training_metrics(self, models: list[str]) -> list[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("farm_training_jobs", "LoRA training jobs by model and state", labels=["model", "state"])
        step = GaugeMetricFamily("farm_training_step", "Running training jobs' recorded step", labels=["job", "model"])
        total = GaugeMetricFamily("farm_training_total_steps", "Running training jobs' total steps", labels=["job", "model"])
        loss = GaugeMetricFamily("farm_training_loss", "Running training jobs' last recorded loss", labels=["job", "model"])
        eta = GaugeMetricFamily("farm_training_eta_seconds", "Running training jobs' estimated seconds left", labels=["job", "model"])
        with self.services.sessions() as session:
            found = {
                (model, state): count
                for model, state, count in session.execute(
                    select(TrainingJobRecord.model, TrainingJobRecord.state, func.count())
                    .group_by(TrainingJobRecord.model, TrainingJobRecord.state)
                ).all()
            }
            running = session.execute(
                select(TrainingJobRecord.name, TrainingJobRecord.model, TrainingJobRecord.step,
                       TrainingJobRecord.total_steps, TrainingJobRecord.loss, TrainingJobRecord.info)
                .where(TrainingJobRecord.state == TrainingState.running.value)
                .order_by(TrainingJobRecord.name)
            ).all()
        for model in sorted(set(models) | {model for model, _ in found}):
            for state in TrainingState:
                jobs.add_metric([model, state.value], found.get((model, state.value), 0))
        for name, model, at, steps, last, info in running:
            step.add_metric([name, model], at or 0)
            total.add_metric([name, model], steps)
            if last is not None:
                loss.add_metric([name, model], last)
            remaining = (info or {}).get("eta_seconds")
            if isinstance(remaining, (int, float)):
                eta.add_metric([name, model], remaining)
        return [jobs, step, total, loss, eta]

    # -- the broker -------------------------------------------------------------------------------
    def _broker_metrics(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("farm_queue_depth", "Messages waiting in the broker per model", labels=["model"])
        unacked = GaugeMetricFamily("farm_messages_unacked", "Messages delivered, not yet acknowledged", labels=["model"])
        dead = CounterMetricFamily(
            "farm_dead_letters", "Poison messages dead-lettered since the farm began", labels=["queue", "reason"]
        )
        waiting, held = queue_depths(self.services.settings)
        for model in sorted(set(self.services.settings.models) | set(waiting)):
            depth.add_metric([model], waiting.get(model, 0))
            unacked.add_metric([model], held.get(model, 0))
        from farm.dispatch.dead_letters import DeadLetters

        with DeadLetters(self.services.settings) as letters:
            for (queue, reason), count in sorted(letters.counts().items()):
                dead.add_metric([queue, reason], count)
        return [depth, unacked, dead]


def queue_depths(settings) -> tuple[dict[str, int], dict[str, int]]:
    """``(waiting, unacked)``: messages per model in the broker, every priority sub-queue and warm
    worker's own queue included."""
    models = sorted(settings.models, key=len, reverse=True)  # the longest name that fits wins
    prefix = f"{settings.queue_prefix}."

    def model_of(queue: str) -> str | None:
        if not queue.startswith(prefix):
            return None
        rest = queue[len(prefix):]
        for model in models:
            if rest == model or rest.startswith((f"{model}:", f"{model}.")):
                return model
        return None

    waiting: dict[str, int] = {}
    held: dict[str, int] = {}
    url = settings.broker
    if url.startswith(("redis://", "rediss://")):
        import json

        import redis

        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        try:
            for key in client.scan_iter(match=f"{prefix}*", count=1000, _type="list"):
                name = key.decode()
                if (model := model_of(name)) is not None:
                    waiting[model] = waiting.get(model, 0) + client.llen(key)
            for _field, raw in client.hscan_iter("unacked", count=1000):
                try:
                    routing_key = json.loads(raw)[2]
                except (ValueError, IndexError, TypeError):
                    continue
                if isinstance(routing_key, str) and (model := model_of(routing_key)) is not None:
                    held[model] = held.get(model, 0) + 1
        finally:
            client.close()
    elif url.startswith("filesystem://"):
        folder = settings.broker_folder / "queue"
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith(".") or not path.name.endswith(".msg"):
                    continue
                queue = path.name.split(".", 1)[1][: -len(".msg")]
                if (model := model_of(queue)) is not None:
                    waiting[model] = waiting.get(model, 0) + 1
    return waiting, held


def serve(services: Services, *, host: str, port: int, cache_seconds: float = 10.0):
    """Serve ``/metrics`` on ``host:port`` from a thread; returns the server (``shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(services, cache_seconds=cache_seconds))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server

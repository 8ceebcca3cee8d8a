"""The Celery app both sides share: JSON only, late acks, one message at a time per worker.

The submitter only *publishes* (``send_task`` by name), so it never imports worker code; the
worker registers the task of that name in ``workers.tasks``.
"""

from __future__ import annotations

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

from farm.settings import Settings

#: The one task name the farm publishes: render a batch of images that share a GPU batch.
RENDER_TASK = "farm.render"

TRANSPORT_ALIASES.setdefault("farmfs", "farm.dispatch.broker_fs:Transport")


def broker_url(settings: Settings) -> str:
    """``filesystem://`` (the embedded default) is served by farm's safer subclass, ``farmfs://``."""
    url = settings.broker
    if url.startswith("filesystem://"):
        return "farmfs://localhost/"
    return url


def transport_options(settings: Settings) -> dict:
    url = broker_url(settings)
    if url.startswith("farmfs://"):
        folder = settings.broker_folder
        for sub in ("queue", "control", "claimed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    if url.startswith(("redis://", "rediss://", "sentinel://")):
        # Above the longest task: a task that outlives it is delivered a second time (harmless to
        # the records, see workers.tasks, but wasted GPU time).
        return {
            "visibility_timeout": settings.visibility_timeout,
            # priorities: 0 (interactive submits) is served before 6 (campaigns, by default)
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
        }
    return {}


def make_celery(settings: Settings) -> Celery:
    url = broker_url(settings)
    app = Celery("farm", broker=url, set_as_current=False)
    app.conf.update(
        # JSON only: a pickled message would run code on every worker.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        # Nothing accepted is lost: ack after the work, requeue if the worker process dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        # Results live in the farm's database, not in a Celery result backend.
        task_ignore_result=True,
        # Flower: task events, readable names, a per-step PROGRESS state (workers.tasks).
        worker_send_task_events=not url.startswith("farmfs://"),
        # No task-sent events: they double the cost of publishing a 100k-image campaign; Flower
        # shows each task from the moment a worker receives it.
        task_send_sent_event=False,
        task_track_started=True,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        # Loading an SD pipeline in a fresh pool process takes longer than Celery's 4 s default.
        worker_proc_alive_timeout=600,
        worker_hijack_root_logger=False,
        enable_utc=True,
        task_default_queue=settings.queue_for(settings.default_model),
    )
    return app

"""``farm top``: the farm at a glance, for an operator — what each worker renders and how fast,
what waits in the broker, and why images failed in the last hour.

Everything comes from the database (the images' records: who holds what, when each finished) and the
broker's queue lengths (``farm.metrics.queue_depths``), so it works from any machine that has the
farm's settings, with no agent on the workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, select

from farm.db.tables import ImageRecord, Status, utcnow
from farm.failures import lines, summarize
from farm.services import Services

__all__ = ["Snapshot", "WorkerLine", "snapshot"]

#: Seconds over which each worker's images/s is measured.
RATE_WINDOW_SECONDS = 60
#: Seconds of failures shown.
FAILURE_WINDOW_SECONDS = 3600


@dataclass
class WorkerLine:
    worker: str
    running: int = 0  # images it holds now
    doing: str = ""  # what, e.g. "'a red circle' · 64x64 · step 12/20"
    images_per_s: float = 0.0


@dataclass
class Snapshot:
    workers: list[WorkerLine] = field(default_factory=list)
    queue_depth: dict[str, int] = field(default_factory=dict)  # model → messages waiting
    broker_error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, tuple[int, str]] = field(default_factory=dict)  # the last hour, by class

    def __str__(self) -> str:
        out = ["WORKER".ljust(36) + "HOLDS".rjust(6) + "  IMG/S".rjust(8) + "  RENDERING"]
        for line in self.workers:
            out.append(f"{line.worker[:35]:<36}{line.running:>6}{line.images_per_s:>8.2f}  {line.doing}")
        if not self.workers:
            out.append("(no worker rendered in the last minute)")
        depth = ", ".join(f"{model} {n}" for model, n in sorted(self.queue_depth.items())) or "empty"
        out.append(f"queue: {depth}" if self.broker_error is None else f"queue: broker unreachable ({self.broker_error})")
        out.append("images: " + ", ".join(f"{n} {state}" for state, n in self.counts.items() if n))
        out.append(f"failures in the last hour: {sum(c for c, _ in self.failures.values())}")
        out.extend(lines(self.failures))
        return "\n".join(out)


def snapshot(services: Services) -> Snapshot:
    now = utcnow()
    result = Snapshot()
    workers: dict[str, WorkerLine] = {}
    with services.sessions() as session:
        running = session.execute(
            select(ImageRecord.worker, func.count(), func.min(ImageRecord.prompt), func.min(ImageRecord.width),
                   func.min(ImageRecord.height), func.max(ImageRecord.steps), func.max(ImageRecord.steps_done))
            .where(ImageRecord.status == Status.running.value)
            .group_by(ImageRecord.worker)
        ).all()
        for worker, count, prompt, width, height, steps, done in running:
            excerpt = " ".join((prompt or "").split())[:40]
            workers[worker or "?"] = WorkerLine(
                worker or "?", count, f"'{excerpt}' · {width}x{height} · step {done or 0}/{steps}"
            )
        since = now - timedelta(seconds=RATE_WINDOW_SECONDS)
        for worker, count in session.execute(
            select(ImageRecord.worker, func.count())
            .where(ImageRecord.status == Status.succeeded.value, ImageRecord.finished_at >= since)
            .group_by(ImageRecord.worker)
        ):
            line = workers.setdefault(worker or "?", WorkerLine(worker or "?"))
            line.images_per_s = count / RATE_WINDOW_SECONDS
        found = dict(session.execute(select(ImageRecord.status, func.count()).group_by(ImageRecord.status)).all())
        result.counts = {s.value: int(found.get(s.value, 0)) for s in Status}
        result.failures = summarize(session, ImageRecord.finished_at >= now - timedelta(seconds=FAILURE_WINDOW_SECONDS))
    result.workers = sorted(workers.values(), key=lambda w: w.worker)
    try:
        from farm.metrics import queue_depths

        result.queue_depth, _unacked = queue_depths(services.settings)
        for model in services.settings.models:
            result.queue_depth.setdefault(model, 0)
    except Exception as exc:  # noqa: BLE001 - the view still shows the database's side
        result.broker_error = type(exc).__name__
    return result

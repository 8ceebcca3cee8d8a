"""Training progress in Prometheus: the worker's gauges (``workers.metrics``, multiprocess mode, set by
the training task every step) and the farm-wide exporter's (``farm.metrics``: jobs by state, running
jobs' step / total / loss / ETA from their rows)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace


from evaluation import shape_data as S
from farm import training
from farm.db.tables import TrainingJobRecord


def test_worker_training_gauges_are_one_series_per_live_process_in_multiprocess_mode(tmp_path: Path) -> None:
    """As ``farm worker`` runs them: a render process writes the gauges to PROMETHEUS_MULTIPROC_DIR, the
    supervisor collects the folder (a pid label per process: liveall)."""
    folder = tmp_path / "prom"
    folder.mkdir()
    code = (
        "from workers.metrics import WorkerMetrics\n"
        "m = WorkerMetrics('w@test')\n"
        "m.training('ink', 'shapes', step=12, total=40, loss=0.25, eta=7.5)\n"
        "m.training('old', 'shapes', step=40, total=40, loss=0.1, eta=None, running=False)\n"
        "import os; print(os.getpid())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)},
                          capture_output=True, text=True, timeout=60, check=True)
    pid = done.stdout.strip()
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))

    def value(name: str, job: str) -> float | None:
        return registry.get_sample_value(name, {"worker": "w@test", "job": job, "model": "shapes", "pid": pid})

    assert value("farm_worker_training_step", "ink") == 12
    assert value("farm_worker_training_total_steps", "ink") == 40
    assert value("farm_worker_training_loss", "ink") == 0.25
    assert value("farm_worker_training_eta_seconds", "ink") == 7.5
    assert value("farm_worker_training_running", "ink") == 1
    # an ended job: last step kept, ETA 0, not running
    assert value("farm_worker_training_step", "old") == 40
    assert value("farm_worker_training_eta_seconds", "old") == 0
    assert value("farm_worker_training_running", "old") == 0


class _Recorder:
    def __init__(self):
        self.calls: list[dict] = []

    def training(self, job, model, **fields):
        self.calls.append({"job": job, "model": model, **fields})

    def __getattr__(self, name):  # any other metric: ignored
        return lambda *a, **k: None


class _FakeTask:
    def __init__(self, app):
        self.request = SimpleNamespace(hostname="trainer@test", id="task-1")
        self.app = SimpleNamespace(conf=SimpleNamespace(worker_send_task_events=False), amqp=app.amqp,
                                   producer_or_acquire=app.producer_or_acquire)




def test_the_training_task_sets_step_total_loss_and_eta_every_step(embedded_farm, farm_settings, tmp_path) -> None:
    import torch

    from workers.context import WorkerContext
    from workers.training.task import run_training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        job = training.submit(embedded_farm.services, name="gauged", data=str(S.write_imagefolder(tmp_path / "data", 2)),
                              model="shapes", steps=3, batch_size=2, rank=2, checkpoint_every=2, sample_every=0, seed=1)
        with embedded_farm.sessions.begin() as session:  # no samples: CPU time
            record = session.get(TrainingJobRecord, job.id)
            record.params = {**record.params, "sample_prompts": []}
        ctx = WorkerContext(settings=farm_settings, model_name="shapes", device="cpu", node="trainer@test")
        ctx._metrics = recorder = _Recorder()
        assert run_training(_FakeTask(embedded_farm.celery), ctx, job.id)["steps"] == 3
    finally:
        torch.set_num_threads(threads)
    calls = recorder.calls
    assert {c["job"] for c in calls} == {"gauged"} and {c["model"] for c in calls} == {"shapes"}
    assert [c["step"] for c in calls if c["running"]] == [0, 1, 2, 3]  # before the first step, then every step
    assert all(c["total"] == 3 for c in calls)
    assert calls[0]["loss"] is None and all(c["loss"] > 0 for c in calls[1:])
    assert calls[1]["eta"] is not None and calls[1]["eta"] >= 0
    assert calls[-1]["running"] is False and calls[-1]["step"] == 3  # the end: ETA 0 in the gauge


def test_the_exporter_counts_training_jobs_by_state_and_shows_the_running_ones(embedded_farm, scrape_exporter) -> None:
    rows = [
        dict(name="done", state="succeeded", step=40, loss=0.01, info={}),
        dict(name="waiting", state="queued", step=0, loss=None, info=None),
        dict(name="busy", state="running", step=17, loss=0.125, info={"eta_seconds": 9.5}),
        dict(name="fresh", state="running", step=0, loss=None, info={"eta_seconds": None}),
    ]
    with embedded_farm.sessions.begin() as session:
        for row in rows:
            session.add(TrainingJobRecord(id=str(uuid.uuid4()), model="shapes", data="x", params={}, total_steps=40,
                                          attempts=1, **row))
    scrape = scrape_exporter(embedded_farm.services)
    assert scrape.value("farm_training_jobs", model="shapes", state="running") == 2
    assert scrape.value("farm_training_jobs", model="shapes", state="queued") == 1
    assert scrape.value("farm_training_jobs", model="shapes", state="succeeded") == 1
    assert scrape.value("farm_training_jobs", model="shapes", state="failed") == 0
    assert scrape.value("farm_training_jobs", model="tiny", state="running") == 0  # every configured model
    assert scrape.value("farm_training_step", job="busy", model="shapes") == 17
    assert scrape.value("farm_training_total_steps", job="busy", model="shapes") == 40
    assert scrape.value("farm_training_loss", job="busy", model="shapes") == 0.125
    assert scrape.value("farm_training_eta_seconds", job="busy", model="shapes") == 9.5
    names = {s.labels.get("job") for s in scrape.samples if s.name == "farm_training_step"}
    assert names == {"busy", "fresh"}  # finished and queued jobs drop out of the series
    assert not [s for s in scrape.samples if s.name == "farm_training_eta_seconds" and s.labels["job"] == "fresh"]
    assert scrape.value("farm_up", component="database") == 1

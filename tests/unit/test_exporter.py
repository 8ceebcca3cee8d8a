"""`farm exporter`'s metrics, scraped over HTTP and read with Prometheus's own text parser, on an
embedded farm: queue depth per model, images by status, failures by reason class, oldest queued age."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from farm import lifecycle
from farm.client import Farm
from farm.db.tables import ImageRecord, utcnow
from farm.failures import reason_class
from farm.settings import Settings


def test_the_exporter_says_what_waits_what_failed_and_why(tmp_path, scrape_exporter) -> None:
    with Farm(Settings(data_dir=tmp_path / "data")) as farm:
        model = farm.settings.default_model
        first = farm.submit_many([{"prompt": "a red circle", "num_images": 3}])
        farm.submit_many([{"prompt": "a blue square", "steps": 7}])
        ids = [r.id for r in first.results()]
        claim = lifecycle.claim(farm.sessions, ids[:2], worker="w", lease_seconds=60, max_attempts=5)
        lifecycle.record_failure(farm.sessions, claim.token, ids[:1], "InputError: init image is not a PNG")
        lifecycle.record_failure(farm.sessions, claim.token, ids[1:2], "OutOfMemoryError: CUDA out of memory")
        with farm.sessions.begin() as session:  # the oldest queued image waited two minutes
            session.execute(update(ImageRecord).where(ImageRecord.id == ids[2]).values(queued_at=utcnow() - timedelta(seconds=120)))

        from farm.db.tables import LeaseRecord
        from farm.dispatch.dead_letters import DeadLetter, DeadLetters, Poison

        farm.reconcile(deep=False)
        with farm.sessions() as session:
            lease_expiry = session.get(LeaseRecord, f"reconciler:{farm.settings.queue_prefix}").expires_at.timestamp()

        queue = farm.settings.queue_for(model)
        with DeadLetters(farm.settings) as letters:  # a poison message the worker kept aside
            letters.add(DeadLetter.of(queue, Poison("no-body", "the message has no body"), "{}"))
        scrape = scrape_exporter(farm.services)

    assert scrape.value("farm_up", component="database") == 1
    assert scrape.value("farm_up", component="broker") == 1
    assert scrape.value("farm_images", model=model, status="queued") == 2
    assert scrape.value("farm_images", model=model, status="failed") == 2
    assert scrape.value("farm_images_failed", reason="input") == 1
    assert scrape.value("farm_images_failed", reason="out_of_memory") == 1
    assert 119 <= scrape.value("farm_oldest_queued_seconds", model=model) < 600
    assert scrape.value("farm_dead_letters_total", queue=queue, reason="no-body") == 1
    # a reconciler round took the lease: its expiry is a metric (an alert fires when it goes stale)
    assert abs(scrape.value("farm_reconciler_lease_expiry_timestamp_seconds") - lease_expiry) < 1
    # two tasks were published (two batch keys); the embedded broker's queue is a folder
    assert scrape.value("farm_queue_depth", model=model) == 2


def test_a_database_outage_is_a_metric_not_a_crash(tmp_path) -> None:
    from farm.metrics import FarmCollector
    from farm.services import Services

    services = Services.open(Settings(data_dir=tmp_path / "data"))
    services.engine.dispose()
    (tmp_path / "data" / "farm.db").unlink()  # the database is gone: every query fails
    try:
        families = {f.name: f for f in FarmCollector(services, cache_seconds=0).collect()}
    finally:
        services.close()
    up = {tuple(s.labels.values()): s.value for s in families["farm_up"].samples}
    assert up[("database",)] == 0


def test_reason_classes() -> None:
    assert reason_class("StorageUnavailable: S3 did not answer") == "storage"
    assert reason_class("gave up after 5 attempts: the worker rendering it stopped each time") == "worker_lost"
    assert reason_class("RuntimeError: CUDA out of memory. Tried to allocate 2 GiB") == "out_of_memory"
    assert reason_class("LoraError: shapes-green does not fit model tiny") == "lora"
    assert reason_class("KeyError: 'x'") == "other"
    assert reason_class(None) == "other"

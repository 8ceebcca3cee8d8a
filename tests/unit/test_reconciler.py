"""The reconciler brings stranded work back with no person and no id: work recorded and never
published, images queued again whose publish failed, messages the broker lost, dead workers' leases.
On an embedded farm (SQLite + the filesystem broker), whose queue is a folder we can read and empty."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from farm import lifecycle
from farm.client import Farm
from farm.db.tables import ImageRecord, SubmissionRecord, utcnow
from farm.dispatch import publish as publish_module
from farm.errors import PublishError
from farm.reconciler import Reconciler
from farm.services import Services
from farm.settings import Settings


def _settings(tmp_path: Path, **extra) -> Settings:
    return Settings(data_dir=tmp_path / "data", reconcile_grace_seconds=0, **extra)


def _queued_messages(settings: Settings) -> dict[str, list[str]]:
    """task id → image ids of every message in the embedded broker's queue folder."""
    found: dict[str, list[str]] = {}
    for path in (settings.broker_folder / "queue").glob("*.msg"):
        envelope = json.loads(path.read_bytes())
        import base64

        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        found.setdefault(envelope["headers"]["id"], []).extend(kwargs["image_ids"])
    return found


def _empty_broker(settings: Settings) -> None:
    """What a broker restarted without persistence looks like: no messages, no marker."""
    for path in (settings.broker_folder / "queue").glob("*.msg"):
        path.unlink()
    (settings.broker_folder / "epoch").unlink(missing_ok=True)


def _refuse_publishing(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise PublishError("broker down (test)")

    monkeypatch.setattr(publish_module, "publish", refuse)
    import farm.client

    monkeypatch.setattr(farm.client, "publish", refuse)


@pytest.fixture
def farm(tmp_path: Path):
    with Farm(_settings(tmp_path)) as farm:
        yield farm


def _image_ids(farm: Farm, submission_id: str) -> list[str]:
    with farm.sessions() as session:
        return list(session.scalars(select(ImageRecord.id).where(ImageRecord.submission_id == submission_id)))


def test_a_submission_whose_publish_failed_is_published_by_the_next_round(farm, monkeypatch) -> None:
    with monkeypatch.context() as patch:
        _refuse_publishing(patch)
        seen = []
        job = farm.submit_many([{"prompt": "a red circle", "num_images": 3}], on_recorded=seen.append)
    assert [s.id for s in seen] == [job.id]  # the id was known before publishing was tried
    assert _queued_messages(farm.settings) == {}
    with farm.sessions() as session:
        assert session.get(SubmissionRecord, job.id).published_at is None

    result = farm.reconcile()

    assert result.leader and result.published == 3 and not result.errors
    queued = _queued_messages(farm.settings)
    assert sorted(i for ids in queued.values() for i in ids) == sorted(_image_ids(farm, job.id))
    with farm.sessions() as session:
        assert session.get(SubmissionRecord, job.id).published_at is not None
    assert farm.reconcile(deep=False).published == 0  # published once, not every round


def test_grace_keeps_the_reconciler_off_a_submit_in_progress(tmp_path, monkeypatch) -> None:
    with Farm(Settings(data_dir=tmp_path / "data", reconcile_grace_seconds=3600)) as farm, monkeypatch.context() as patch:
        _refuse_publishing(patch)
        farm.submit("a red circle")
        patch.undo()
        assert farm.reconcile().published == 0


def test_images_lost_with_the_broker_are_published_again(farm) -> None:
    job = farm.submit_many([{"prompt": "a blue square", "num_images": 2}, {"prompt": "a green star", "seed": 4, "steps": 7}])
    farm.reconcile()  # the first round sets the broker's marker
    before = _queued_messages(farm.settings)
    assert len(before) == 2
    assert farm.reconcile().republished == 0  # nothing is lost: nothing sent twice

    _empty_broker(farm.settings)
    result = farm.reconcile(deep=None)  # the marker is gone: the broker is compared at once

    assert result.deep and result.republished == 3
    assert _queued_messages(farm.settings) == before  # the same task ids, the same images


def test_only_the_lost_messages_are_sent_again(farm) -> None:
    first = farm.submit("a red circle")
    second = farm.submit("a blue square")
    farm.reconcile()
    [lost_task] = [t for t, ids in _queued_messages(farm.settings).items() if ids == _image_ids(farm, first.id)]
    for path in (farm.settings.broker_folder / "queue").glob("*.msg"):
        if json.loads(path.read_bytes())["headers"]["id"] == lost_task:
            path.unlink()
    result = farm.reconcile(deep=True)
    assert result.republished == 1
    queued = _queued_messages(farm.settings)
    assert len(queued) == 2 and lost_task in queued
    assert sorted(i for ids in queued.values() for i in ids) == sorted(_image_ids(farm, first.id) + _image_ids(farm, second.id))


def test_a_dead_workers_images_are_queued_again_and_published(farm) -> None:
    job = farm.submit_many([{"prompt": "a red circle", "num_images": 2}])
    ids = _image_ids(farm, job.id)
    _empty_broker(farm.settings)  # the worker took the message, then died
    claim = lifecycle.claim(farm.sessions, ids, worker="w", lease_seconds=60, max_attempts=5)
    with farm.sessions.begin() as session:  # its lease ran out
        session.execute(
            update(ImageRecord).where(ImageRecord.claim_token == claim.token).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    result = farm.reconcile(deep=False)
    assert result.taken_back == 2
    assert sorted(i for v in _queued_messages(farm.settings).values() for i in v) == sorted(ids)
    assert job.status().counts["queued"] == 2


def test_images_released_while_the_broker_refused_are_published_from_the_outbox(farm, monkeypatch) -> None:
    job = farm.submit("a red circle")
    [image_id] = _image_ids(farm, job.id)
    _empty_broker(farm.settings)
    claim = lifecycle.claim(farm.sessions, [image_id], worker="w", lease_seconds=60, max_attempts=5)
    assert lifecycle.release(farm.sessions, claim.token, note="shutting down") == 1
    with farm.sessions() as session:
        row = session.get(ImageRecord, image_id)
        assert row.publish_after is not None and row.attempts == 0  # marked; no attempt counted

    result = farm.reconcile(deep=False)

    assert result.published == 1
    assert list(_queued_messages(farm.settings).values()) == [[image_id]]
    with farm.sessions() as session:
        assert session.get(ImageRecord, image_id).publish_after is None


def test_one_reconciler_leads_at_a_time(tmp_path) -> None:
    settings = _settings(tmp_path)
    services = Services.open(settings)
    try:
        first, second = Reconciler(services, holder="a"), Reconciler(services, holder="b")
        assert first.run_once().leader
        assert not second.run_once().leader
        assert first.run_once().leader  # the leader renews
        first.step_down()
        assert second.run_once().leader  # stepping down hands over at once
    finally:
        services.close()


def test_a_round_during_a_broker_outage_reports_and_keeps_the_work(farm, monkeypatch) -> None:
    with monkeypatch.context() as patch:
        _refuse_publishing(patch)
        job = farm.submit("a red circle")
        result = farm.reconcile()
        assert result.errors and "broker down" in result.errors[0]
    assert farm.reconcile().published == 1  # the broker is back: the next round publishes it
    assert job.status().counts["queued"] == 1


def test_farm_reconcile_command(tmp_path, monkeypatch) -> None:
    from farm.cli.main import main

    settings = _settings(tmp_path)
    monkeypatch.setenv("FARM_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("FARM_RECONCILE_GRACE_SECONDS", "0")
    with Farm(settings) as farm, monkeypatch.context() as patch:
        _refuse_publishing(patch)
        farm.submit_many([{"prompt": "a red circle", "num_images": 2}])
    result = CliRunner().invoke(main, ["reconcile"])
    assert result.exit_code == 0, result.output
    assert "published from the outbox: 2" in result.output
    assert len(_queued_messages(settings)) == 1


def test_retry_failed_for_a_plain_submission(farm) -> None:
    job = farm.submit_many([{"prompt": "a red circle", "num_images": 2}])
    ids = _image_ids(farm, job.id)
    claim = lifecycle.claim(farm.sessions, ids, worker="w", lease_seconds=60, max_attempts=5)
    lifecycle.record_failure(farm.sessions, claim.token, ids, "RuntimeError: boom")
    _empty_broker(farm.settings)
    assert job.retry_failed() == 2
    assert job.status().counts["queued"] == 2
    assert sorted(i for v in _queued_messages(farm.settings).values() for i in v) == sorted(ids)


def test_a_round_publishes_training_jobs_a_dead_worker_or_a_lost_broker_left_behind(farm_settings) -> None:
    """The reconciler heals training jobs too: an expired lease, an outbox mark, a lost message."""
    from datetime import timedelta
    from unittest import mock

    from farm import training
    from farm.db.tables import TrainingJobRecord, TrainingState, utcnow
    from farm.reconciler import Reconciler
    from farm.services import Services

    services = Services.open(farm_settings.model_copy(update={"reconcile_grace_seconds": 5}))
    now = utcnow()
    rows = {
        "dead": dict(state="running", lease_expires_at=now - timedelta(seconds=30), claim_token="t"),
        "alive": dict(state="running", lease_expires_at=now + timedelta(seconds=30), claim_token="u"),
        "unsent": dict(state="queued", publish_after=now - timedelta(seconds=60)),
        "fresh": dict(state="queued", publish_after=now),  # its submitter is publishing it right now
        "sent": dict(state="queued", publish_after=None, created_at=now - timedelta(seconds=60)),
        "done": dict(state="succeeded"),
    }
    with services.sessions.begin() as session:
        for name, values in rows.items():
            session.add(TrainingJobRecord(id=name, name=name, model="tiny", data="x", params={}, total_steps=10, **values))
    published: list[str] = []
    with mock.patch.object(training, "publish_job", lambda sessions, app, settings, job_id, **kw: published.append(job_id)):
        reconciler = Reconciler(services)
        reconciler.broker = mock.Mock(return_orphaned=lambda: 0, lost_state=lambda: False)
        reconciler._last_deep = float("inf") * -1
        first = reconciler.run_once(deep=False)
        assert sorted(published) == ["dead", "unsent"] and first.training == 2 and not first.errors
        published.clear()
        reconciler._republish_lost = lambda: 0
        deep = reconciler.run_once(deep=True)  # the broker may have lost every message
    assert "sent" in published and "fresh" not in published and "alive" not in published and "done" not in published
    assert deep.training == len(published)
    with services.sessions() as session:
        dead = session.get(TrainingJobRecord, "dead")
        assert dead.state == TrainingState.queued.value and dead.claim_token is None
    services.close()

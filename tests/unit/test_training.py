"""LoRA training jobs (farm.training, workers.training) on an embedded farm with the shapes model, on CPU:
bad datasets refused at submit (one clear line, nothing recorded), a short run end to end (a LoRA
registered and used in a render), and checkpoint/resume (a run interrupted after a checkpoint and
claimed again once its lease expired ends where an uninterrupted run of the same seed ends)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select, update

from evaluation import shape_data as S
from farm import training
from farm.db.tables import ImageRecord, TrainingJobRecord, utcnow
from farm.errors import NotFound, ValidationError

SHAPES_LORA = Path(__file__).resolve().parents[2] / "models" / "shapes" / "loras" / "green.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_folder(root: Path, n: int = 8, *, seed: int = 0, caption_column: str = "text") -> Path:
    """An imagefolder of ``n`` shapes drawings with their captions."""
    return S.write_imagefolder(root, n, seed=seed, caption_column=caption_column)


def jobs(farm) -> int:
    with farm.sessions() as session:
        return session.scalar(select(func.count()).select_from(TrainingJobRecord))


class FakeTask:
    """What the task body uses of Celery's task: its request, its app (publishing) and progress events."""

    def __init__(self, app, events: bool = True):
        self.request = SimpleNamespace(hostname="trainer@test", id="task-1")
        self.app = SimpleNamespace(conf=SimpleNamespace(worker_send_task_events=events), amqp=app.amqp,
                                   producer_or_acquire=app.producer_or_acquire)
        self.events: list[dict] = []

    def send_event(self, kind, **fields):
        self.events.append({"type": kind, **fields})


def worker_context(settings):
    from workers.context import WorkerContext

    return WorkerContext(settings=settings, model_name="shapes", device="cpu", node="trainer@test")


# -- refused at submit -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty", "lists no image: an empty dataset"),
        ("no caption", "has no caption"),
        ("unreadable", "cannot be read"),
        ("missing image", "does not exist"),
        ("resolution", "resolution=60 is invalid: must be a multiple of 8"),
        ("unknown model", "unknown model"),
        ("nothing there", "is not a campaign, an imagefolder directory"),
        ("no metadata", "has no metadata.jsonl"),
    ],
)
def test_bad_datasets_are_refused_at_submit_with_one_clear_line(embedded_farm, tmp_path, case, expected):
    folder = make_folder(tmp_path / "data", 3)
    kwargs = {"name": "x", "data": str(folder), "model": "shapes"}
    if case == "empty":
        (folder / "metadata.jsonl").write_text("\n")
    elif case == "no caption":
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": " "}) + "\n")
    elif case == "unreadable":
        (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "missing image":
        (folder / "2.png").unlink()
    elif case == "resolution":
        kwargs["resolution"] = 60
    elif case == "unknown model":
        kwargs["model"] = "nope"
    elif case == "nothing there":
        kwargs["data"] = str(tmp_path / "absent")
    elif case == "no metadata":
        (folder / "metadata.jsonl").unlink()
    with pytest.raises(ValidationError) as caught:
        training.submit(embedded_farm.services, **kwargs)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message
    assert jobs(embedded_farm) == 0
    assert not (embedded_farm.settings.data_dir / "images" / "training_data").exists()  # nothing uploaded


def test_a_taken_name_and_an_empty_campaign_are_refused(embedded_farm, tmp_path):
    folder = make_folder(tmp_path / "data", 2)
    embedded_farm.add_lora(SHAPES_LORA, name="green")
    with pytest.raises(ValidationError, match="is taken by a registered LoRA"):
        training.submit(embedded_farm.services, name="green", data=str(folder), model="shapes")
    embedded_farm.campaign("drawn").submit([{"prompt": "a red circle on a blue background", "model": "shapes"}])
    with pytest.raises(ValidationError, match="no succeeded images yet: an empty dataset"):
        training.submit(embedded_farm.services, name="fresh", data="drawn", model="shapes")
    with pytest.raises(ValidationError, match="rank"):
        training.submit(embedded_farm.services, name="fresh", data=str(folder), model="shapes", rank=0)
    assert jobs(embedded_farm) == 0
    with pytest.raises(NotFound):
        training.status(embedded_farm.services, "fresh")


def test_the_cli_refuses_in_one_line_and_reports_status_as_json(farm_cli, tmp_path):
    folder = make_folder(tmp_path / "data", 2, caption_column="caption")
    bad = farm_cli("train", "lora", "--name", "x", "--data", folder, "--model", "shapes", "--resolution", "100")
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "resolution" in bad.stderr, bad.stderr
    ok = farm_cli("train", "lora", "--name", "ink", "--data", folder, "--model", "shapes", "--steps", "3", "--rank", "2")
    assert ok.exit_code == 0, ok.stderr
    shown = farm_cli("train", "status", "ink")
    assert shown.exit_code == 0, shown.stderr
    last = json.loads(shown.stdout.strip().splitlines()[-1])
    assert last["state"] == "queued" and last["step"] == 0 and last["total_steps"] == 3 and last["images"] == 2
    assert last["params"]["rank"] == 2 and last["params"]["resolution"] == 64  # the model's own size
    taken = farm_cli("train", "lora", "--name", "ink", "--data", folder, "--model", "shapes")
    assert taken.exit_code == 2 and "taken by another training job" in taken.stderr


def test_a_submitted_job_is_recorded_and_published_to_the_models_queue(embedded_farm, tmp_path):
    folder = make_folder(tmp_path / "data", 4)
    job = training.submit(embedded_farm.services, name="ink", data=str(folder), model="shapes", steps=5, seed=3)
    assert job.state == "queued" and job.publish_after is None and job.total_steps == 5  # published: mark cleared
    items = job.params["dataset"]["items"]
    assert len(items) == 4 and all(embedded_farm.storage.exists(i["key"]) for i in items)
    queue = embedded_farm.settings.broker_folder / "queue"
    messages = [json.loads(p.read_text()) for p in queue.iterdir() if p.is_file()]
    assert [m["headers"]["task"] for m in messages] == ["farm.train_lora"]
    assert messages[0]["headers"]["id"] == job.task_id
    via_client = embedded_farm.train_lora("ink2", folder, model="shapes", steps=2)  # Farm.train_lora: the same path
    assert via_client.state == "queued" and via_client.params["dataset"]["items"] == items


def test_a_canceled_job_is_not_trained(embedded_farm, farm_settings, tmp_path):
    from workers.training.task import run_training

    folder = make_folder(tmp_path / "data", 2)
    job = training.submit(embedded_farm.services, name="stop", data=str(folder), model="shapes", steps=3)
    assert training.cancel(embedded_farm.services, "stop") is True
    assert training.cancel(embedded_farm.services, "stop") is False  # already finished
    outcome = run_training(FakeTask(embedded_farm.celery), worker_context(farm_settings), job.id)
    assert outcome == {"job": job.id, "skipped": "canceled"}
    assert training.status(embedded_farm.services, "stop")["state"] == "canceled"


def test_storage_away_hands_the_job_back_and_a_missing_image_fails_it(embedded_farm, farm_settings, tmp_path, monkeypatch):
    from farm.errors import MissingObject, StorageError
    from workers.training.task import run_training

    folder = make_folder(tmp_path / "data", 2)
    job = training.submit(embedded_farm.services, name="later", data=str(folder), model="shapes", steps=2)
    ctx = worker_context(farm_settings)
    storage = ctx.storage

    def away(key):
        raise StorageError(f"S3 get timed out ({key})")

    monkeypatch.setattr(storage, "get", away)
    outcome = run_training(FakeTask(embedded_farm.celery), ctx, job.id)
    assert "released" in outcome, outcome
    found = training.status(embedded_farm.services, "later")
    assert found["state"] == "queued" and found["attempts"] == 0 and "S3 get timed out" in found["error"]

    def gone(key):
        raise MissingObject(f"no object {key!r}")

    monkeypatch.setattr(storage, "get", gone)
    outcome = run_training(FakeTask(embedded_farm.celery), ctx, job.id)
    found = training.status(embedded_farm.services, "later")
    assert found["state"] == "failed" and found["error"].startswith("MissingObject: no object"), found


# -- on a worker ------------------------------------------------------------------------------------


def read_lora(storage, key):
    from safetensors.torch import load

    return load(storage.get(key))


def test_a_short_run_end_to_end_registers_a_lora_a_render_can_use(embedded_farm, farm_settings, tmp_path):
    from farm.db.tables import LoraRecord
    from workers import tasks
    from workers.training.task import run_training

    folder = make_folder(tmp_path / "data", 8)
    job = training.submit(
        embedded_farm.services, name="mine", data=str(folder), model="shapes", steps=6, batch_size=4, rank=2, lr=1e-3,
        checkpoint_every=3, sample_every=3, seed=1,
    )
    with embedded_farm.sessions.begin() as session:  # fewer sample images: CPU time
        record = session.get(TrainingJobRecord, job.id)
        record.params = {**record.params, "sample_prompts": ["a red circle on a blue background"]}
    task = FakeTask(embedded_farm.celery)
    outcome = run_training(task, worker_context(farm_settings), job.id)
    assert outcome["steps"] == 6, outcome
    found = training.status(embedded_farm.services, "mine")
    assert found["state"] == "succeeded" and found["step"] == 6 and found["loss"] > 0 and found["error"] is None
    assert found["checkpoint_step"] == 3 and embedded_farm.storage.exists(found["checkpoint_key"])
    assert sorted(found["samples"]) == ["3", "6"] and all(embedded_farm.storage.exists(k) for k in found["samples"]["6"])
    progress = [e for e in task.events if e["type"] == "task-progress"]
    assert progress and progress[-1]["step"] == 6 and progress[-1]["result"].startswith("step 6/6 · loss ")
    # registered: by name, diffusers layout, fits the shapes model
    with embedded_farm.sessions() as session:
        lora = session.scalar(select(LoraRecord).where(LoraRecord.name == "mine"))
    assert lora is not None and lora.sha256 == outcome["sha256"] and lora.format == "diffusers" and lora.base == "shapes"
    keys = read_lora(embedded_farm.storage, lora.storage_key)
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)

    # usable in a render at once: named at submit, loaded by a worker
    submission = embedded_farm.submit("a red circle on a blue background", model="shapes", steps=4,
                                      loras=[{"name": "mine", "weight": 1.0}])
    with embedded_farm.sessions() as session:
        ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.submission_id == submission.id)))
    ctx = worker_context(farm_settings.model_copy(update={"render_overlap_tasks": False}))
    render_task = SimpleNamespace(request=SimpleNamespace(hostname="r@test", id="render-1"), app=embedded_farm.celery)
    try:
        tasks.run_render(render_task, ctx, ids, "shapes")
    finally:
        ctx.close(timeout=30)
    with embedded_farm.sessions() as session:
        [image] = session.scalars(select(ImageRecord).where(ImageRecord.submission_id == submission.id)).all()
    assert image.status == "succeeded", image.error
    assert [entry["sha256"] for entry in image.info["loras"]] == [lora.sha256]


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(
    embedded_farm, farm_settings, tmp_path, monkeypatch
):
    from workers.training import task as training_task

    folder = make_folder(tmp_path / "data", 6)
    common = dict(data=str(folder), model="shapes", steps=8, batch_size=2, rank=2, lr=1e-3, checkpoint_every=4, seed=7)
    straight = training.submit(embedded_farm.services, name="straight", **common)
    broken = training.submit(embedded_farm.services, name="broken", **common)
    for job in (straight, broken):
        with embedded_farm.sessions.begin() as session:
            session.get(TrainingJobRecord, job.id).params = {**job.params, "sample_prompts": []}
    ctx = worker_context(farm_settings)
    task = FakeTask(embedded_farm.celery, events=False)
    assert training_task.run_training(task, ctx, straight.id)["steps"] == 8

    class Killed(BaseException):
        """The worker process dies: no handler runs, the claim stays with its lease."""

    def die_at_6(step):
        if step == 6:
            raise Killed()

    monkeypatch.setattr(training_task, "_after_step", die_at_6)
    with pytest.raises(Killed):
        training_task.run_training(task, ctx, broken.id)
    monkeypatch.setattr(training_task, "_after_step", lambda step: None)
    found = training.status(embedded_farm.services, "broken")
    assert found["state"] == "running" and found["checkpoint_step"] == 4 and found["attempts"] == 1
    # while the lease is live, another delivery leaves it alone (and publishes itself for later)
    assert training_task.run_training(task, ctx, broken.id)["skipped"] == "running"
    with embedded_farm.sessions.begin() as session:  # the dead worker's lease runs out
        session.execute(update(TrainingJobRecord).where(TrainingJobRecord.id == broken.id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    outcome = training_task.run_training(task, ctx, broken.id)
    assert outcome["resumed_from"] == 4 and outcome["steps"] == 8, outcome
    found = training.status(embedded_farm.services, "broken")
    assert found["state"] == "succeeded" and found["attempts"] == 2

    a = read_lora(embedded_farm.storage, f"training/{straight.id}/straight.safetensors")
    b = read_lora(embedded_farm.storage, f"training/{broken.id}/broken.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    assert any(float(a[k].abs().max()) > 0 for k in a if ".lora_B." in k)  # it trained (B starts at zero)


def test_a_new_attempt_reports_the_checkpoint_step_not_the_dead_attempts(embedded_farm):
    """Claimed again after its worker died at step 16 with a checkpoint at 10: status says 10 at once."""
    sessions = embedded_farm.sessions
    with sessions.begin() as session:
        session.add(TrainingJobRecord(
            id="j", name="j", model="tiny", data="x", params={}, total_steps=60, state="running", step=16,
            checkpoint_step=10, claim_token="dead", lease_expires_at=utcnow() - timedelta(seconds=5), attempts=1,
        ))
    token, job = training.claim(sessions, "j", worker="w2", lease_seconds=30, max_attempts=5)
    assert token is not None and job.step == 10 and job.attempts == 2
    assert training.status(embedded_farm.services, "j")["step"] == 10

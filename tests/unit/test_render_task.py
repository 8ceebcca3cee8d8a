"""workers.tasks.run_render past the claim, with the database and the GPU faked: chunks, out-of-memory,
hand-off to the finisher, images given back when they cannot be stored.

Storage is the shared in-memory fake (``memory_storage``: ``delay`` slows its puts, ``hold`` stalls
them, keys in ``fail`` always fail as a throttled S3 would); the images are the shared ``make_spec`` at 64 px.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from PIL import Image

from farm import lifecycle
from farm.errors import ConfigError
from farm.storage.keys import image_key
from farm.imaging.pnginfo import read_png_metadata
from farm.settings import Settings
from workers import tasks
from workers.context import WorkerContext
from workers.diffusion.render import BatchResult, Rendered


@dataclass
class Run:
    """A fake claim of ``n`` images and what the task did with them."""

    outcome: object = None
    ctx: object = None
    images: list = field(default_factory=list)
    recorded: dict = field(default_factory=dict)  # image id -> (was it in storage then, values)
    failed: dict = field(default_factory=dict)  # image id -> error
    released: list = field(default_factory=list)  # (ids, note, count_attempt)
    republished: list = field(default_factory=list)  # publish_images calls
    chunks: list = field(default_factory=list)  # batch sizes rendered
    record_calls: list = field(default_factory=list)  # image ids of each record_success_many call

    def key(self, n: int) -> str:
        image = self.images[n]
        return image_key(image.submission_id, image.id)


@pytest.fixture
def run_task(monkeypatch, tmp_path, memory_storage, make_spec) -> Callable[..., Run]:
    """``run_task(n=4, *, oom_above=None, unstorable=None, **settings)``: one render task of ``n`` images
    (seeds 0…n-1) storing into ``memory_storage``; chunks of more than ``oom_above`` images run out of
    memory, image number ``unstorable`` cannot be stored."""

    def run_task(n: int = 4, *, oom_above: int | None = None, unstorable: int | None = None, **settings) -> Run:
        storage = memory_storage
        run = Run()
        specs = [make_spec(prompt="a cat", seed=s) for s in range(n)]
        run.images = [SimpleNamespace(id=uuid.uuid4().hex, submission_id=uuid.uuid4().hex, params=s.params(), queued_at=None) for s in specs]
        if unstorable is not None:
            storage.fail.add(run.key(unstorable))
        lock = threading.Lock()

        def record_success(sessions, token, image_id, *, storage_key, **values):
            with lock:
                run.recorded[image_id] = (storage.exists(storage_key), values)  # uploaded before the record?
            return True

        def record_success_many(sessions, token, images):
            with lock:
                run.record_calls.append([image_id for image_id, _values in images])
            return [image_id for image_id, values in images if record_success(sessions, token, image_id, **values)]

        def record_failure(sessions, token, image_ids, error):
            run.failed.update({i: error for i in image_ids})
            return len(image_ids)

        def release(sessions, token, *, note=None, image_ids=None, count_attempt=False):
            run.released.append((image_ids, note, count_attempt))
            return len(image_ids or [])

        def render(task, ctx, claim, image_ids, chunk_specs, conditions):
            if oom_above is not None and len(chunk_specs) > oom_above:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            run.chunks.append(len(chunk_specs))
            images = [Rendered(image=Image.new("RGB", (64, 64), (s.seed * 40, 0, 0)), prompt_tokens=2, prompt_truncated=False)
                      for s in chunk_specs]
            return BatchResult(images=images, seconds=0.5 * len(chunk_specs), interrupted=False)

        monkeypatch.setattr(lifecycle, "claim", lambda *a, **k: lifecycle.Claim(token="t", images=run.images))
        monkeypatch.setattr(lifecycle, "record_success", record_success)
        monkeypatch.setattr(lifecycle, "record_success_many", record_success_many)
        monkeypatch.setattr(lifecycle, "record_failure", record_failure)
        monkeypatch.setattr(lifecycle, "release", release)
        monkeypatch.setattr(lifecycle, "heartbeat", lambda *a, **k: 1)
        monkeypatch.setattr(tasks, "_fetch_inputs", lambda ctx, claim, specs: (run.images, specs, [None] * len(specs)))
        monkeypatch.setattr(tasks, "_activate_loras", lambda ctx, loras: [])
        monkeypatch.setattr(tasks, "_render", render)

        options = {"upload_retries": 0, **settings}
        ctx = WorkerContext(settings=Settings(data_dir=tmp_path, **options), model_name="tiny", device="cpu")
        ctx._storage = storage
        ctx._sessions = object()
        ctx._model = SimpleNamespace(hash="abcdef1234", path="/models/tiny")
        task = SimpleNamespace(request=SimpleNamespace(hostname="h", retries=0, id="task-1"), app=object())
        monkeypatch.setattr(
            tasks, "publish_images",
            lambda sessions, app, settings, image_ids, **kwargs: run.republished.append({"image_ids": list(image_ids), **kwargs}),
        )
        run.ctx = ctx
        run.task_error = None
        try:
            run.outcome = tasks.run_render(task, ctx, [i.id for i in run.images], "tiny")
        except tasks.ImagesFailed as exc:  # the task's own state says its images failed (Flower)
            run.outcome, run.task_error = None, str(exc)
        return run

    return run_task


def test_the_task_returns_before_its_uploads_and_each_image_is_recorded_after_its_upload(run_task, memory_storage) -> None:
    storage = memory_storage
    storage.hold = threading.Event()  # no upload can finish until the task has returned
    run = run_task()
    assert storage.keys() == [] and run.recorded == {}  # acked while the PNGs upload: the next task renders
    assert run.outcome == {"rendered": 4, "seconds": 2.0, "chunks": 1}
    storage.hold.set()
    assert run.ctx.finisher.wait(timeout=10)
    assert len(run.recorded) == 4 and all(uploaded for uploaded, _ in run.recorded.values())
    assert not run.released and not run.failed
    parameters, spec = read_png_metadata(storage.get(run.key(2)))
    assert spec["seed"] == 2 and "Seed: 2" in parameters
    assert storage.head(run.key(2))["farm-seed"] == "2"
    values = run.recorded[run.images[0].id][1]
    assert values["gpu_seconds"] == 0.5 and values["info"]["batch_size"] == 4


def test_without_overlap_the_task_returns_once_its_images_are_recorded(run_task, memory_storage) -> None:
    memory_storage.delay = 0.1
    run = run_task(render_overlap_tasks=False)
    assert run.outcome == {"rendered": 4, "seconds": 2.0, "chunks": 1, "recorded": 4, "queued_again": 0}
    assert len(run.recorded) == 4


def test_a_task_renders_in_the_chunks_set_for_its_size(run_task) -> None:
    run = run_task(n=8, max_batch_size=8, render_batch_sizes="64x64=3,512x512=8")
    run.ctx.finisher.wait(timeout=10)
    assert run.chunks == [3, 3, 2]
    assert run.outcome["chunks"] == 3 and run.outcome["rendered"] == 8
    assert sorted(v["info"]["batch_size"] for _, v in run.recorded.values()) == [2, 2, 3, 3, 3, 3, 3, 3]


def test_out_of_memory_halves_the_chunk_and_the_worker_remembers_it(run_task) -> None:
    run = run_task(n=8, max_batch_size=8, oom_above=2)
    run.ctx.finisher.wait(timeout=10)
    assert run.chunks == [2, 2, 2, 2]  # 8 and 4 ran out of memory; nothing failed
    assert len(run.recorded) == 8 and not run.failed
    assert run.ctx.batch_plan.as_dict() == {"64x64": 2}


def test_out_of_memory_at_one_image_fails_the_images_with_the_reason(run_task) -> None:
    run = run_task(n=3, oom_above=0)
    assert len(run.failed) == 3 and all("OutOfMemoryError" in e and "out of memory" in e for e in run.failed.values())
    # and the task itself ends failed, saying how many and why (what Flower shows)
    assert run.task_error.startswith("3 of 3 image(s) failed: out_of_memory ×3 (OutOfMemoryError: CUDA out of memory")


def test_images_that_cannot_be_stored_are_queued_again_without_an_attempt(run_task, memory_storage) -> None:
    storage = memory_storage
    run = run_task(unstorable=1, render_overlap_tasks=False, upload_retries=1)
    bad = run.images[1].id
    assert run.outcome["recorded"] == 3 and run.outcome["queued_again"] == 1
    assert bad not in run.recorded and not run.failed and not storage.exists(run.key(1))
    [(ids, note, counted)] = run.released
    # storage away is not the image's fault: it goes back without counting an attempt
    assert ids == [bad] and counted is False and "StorageError" in note and "SlowDown" in note
    [again] = run.republished
    # published again through the one publish path, which keeps its task id, model and priority
    assert again["image_ids"] == [bad] and again["countdown"] == tasks.REQUEUE_DELAY


def test_bad_batch_sizes_are_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="FARM_RENDER_BATCH_SIZES"):
        Settings(render_batch_sizes="512x512")


def test_each_chunk_is_recorded_in_one_call(run_task, memory_storage) -> None:
    run = run_task(6, oom_above=4)  # out of memory at 6: chunks of 3
    assert run.ctx.finisher.wait(timeout=10)
    assert run.chunks == [3, 3]
    assert sorted(map(sorted, run.record_calls)) == sorted(  # one database transaction per chunk, not per image
        [sorted(image.id for image in run.images[:3]), sorted(image.id for image in run.images[3:])])
    assert len(run.recorded) == 6 and all(uploaded for uploaded, _ in run.recorded.values())


@pytest.mark.parametrize("chunk_seconds, reports", [(1.3, 0), (2.9, 0), (12.0, 3)])
def test_progress_records_are_throttled_to_long_chunks(monkeypatch, chunk_seconds, reports) -> None:
    """No ``report_progress`` UPDATE within a chunk shorter than PROGRESS_REPORT_EVERY (its record moves
    ``farm wait`` on), at most one per PROGRESS_REPORT_EVERY in a longer one; events at most every PROGRESS_EVERY."""
    import workers.diffusion.render as render_module

    clock = [1000.0]
    steps = 25
    progress, events = [], []

    def render_batch(model, specs, *, base_scheduler_config, conditions=None, on_step=None):
        for done in range(1, steps + 1):
            clock[0] += chunk_seconds / steps
            assert on_step(done, steps)
        return "batch"

    monkeypatch.setattr(tasks.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(render_module, "render_batch", render_batch)
    monkeypatch.setattr(lifecycle, "report_progress", lambda sessions, token, ids, done, total: progress.append(done) or len(ids))
    monkeypatch.setattr(lifecycle, "heartbeat", lambda *a, **k: 1)
    ctx = SimpleNamespace(
        shutdown=SimpleNamespace(overdue=lambda: False), settings=SimpleNamespace(claim_lease_seconds=600.0),
        sessions=None, model=SimpleNamespace(scheduler_config={}),
    )
    task = SimpleNamespace(app=SimpleNamespace(conf=SimpleNamespace(worker_send_task_events=True)),
                           send_event=lambda name, **fields: events.append(fields["step"]))
    assert tasks._render(task, ctx, SimpleNamespace(token="t"), ["a", "b"], [None, None], [None, None]) == "batch"
    assert len(progress) == reports and all(done < steps for done in progress)
    assert events[-1] == steps and len(events) <= chunk_seconds / tasks.PROGRESS_EVERY + 2

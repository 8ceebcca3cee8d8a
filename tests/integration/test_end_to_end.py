"""Submit → database + broker → a real `farm worker --cpu` process → storage, on both setups.

``servers``: PostgreSQL + Redis + moto's S3 server (over HTTP), as in production.
``embedded``: SQLite + the filesystem broker + file storage, the defaults of every command.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from farm.imaging.pnginfo import read_png_metadata
from farm.db.tables import Status

pytestmark = pytest.mark.integration

REQUESTS = [
    {"prompt": "a red circle on a blue background", "negative_prompt": "blurry", "num_images": 4, "seed": 11,
     "width": 64, "height": 64, "steps": 8, "guidance_scale": 7.5, "scheduler": "euler"},
    {"prompt": "a yellow square on a green background", "num_images": 4, "seed": 500,
     "width": 64, "height": 64, "steps": 8, "guidance_scale": 5.0, "scheduler": "dpmpp_2m"},
]


@pytest.fixture(scope="module", params=["servers", "embedded"])
def farm_env(request, make_farm_env):
    env = make_farm_env(request.param)
    env.start_worker("w1")
    return env


@pytest.fixture
def aws(farm_env, s3_env):
    """The test process talks to S3 with the same dummy credentials as the workers."""


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_two_requests_of_four_images_render_and_land_in_storage(farm_env, aws):
    farm = farm_env.farm()
    job = farm.submit_many(REQUESTS)
    final = job.wait(timeout=300)
    assert final.succeeded, [(r.status, r.error) for r in job.results()]
    assert final.counts[Status.succeeded.value] == 8

    results = job.results()
    assert [r.seed for r in results] == [11, 12, 13, 14, 500, 501, 502, 503]
    for result in results:
        assert result.storage_key and result.storage_key.endswith(f"{result.id}.png")
        assert result.queued_at <= result.started_at <= result.finished_at
        assert result.gpu_seconds and result.gpu_seconds > 0
        assert result.worker.startswith("w1@test/")
        assert result.attempts == 1
        assert result.model_path and result.prompt_tokens and result.prompt_truncated is False

        data = farm.storage.get(result.storage_key)
        parameters, spec = read_png_metadata(data)
        assert parameters.startswith(result.prompt)
        assert f"Seed: {result.seed}" in parameters and f"Steps: {result.steps}" in parameters
        assert spec["image_id"] == result.id and spec["seed"] == result.seed
        assert farm.storage.content_type(result.storage_key) == "image/png"
        head = farm.storage.head(result.storage_key)
        assert head["farm-image-id"] == result.id and head["farm-seed"] == str(result.seed)
    # images of the same batch share a GPU batch: two tasks of four
    assert len({r.id for r in results}) == 8


def test_same_request_twice_gives_the_same_pixels_and_alone_equals_in_batch(farm_env, aws):
    farm = farm_env.farm()
    base = {"prompt": "a green triangle on a red background", "width": 64, "height": 64, "steps": 6,
            "scheduler": "euler_a", "guidance_scale": 6.0}
    batch = farm.submit(**base, seeds=[7, 8, 9, 10])
    again = farm.submit(**base, seeds=[7, 8, 9, 10])
    alone = farm.submit(**base, seed=9)
    for job in (batch, again, alone):
        assert job.wait(timeout=300).succeeded
    first = [pixels(farm.storage.get(r.storage_key)) for r in batch.results()]
    second = [pixels(farm.storage.get(r.storage_key)) for r in again.results()]
    single = pixels(farm.storage.get(alone.results()[0].storage_key))
    for a, b in zip(first, second):
        assert np.array_equal(a, b)
    assert np.abs(first[2] - single).max() <= 1  # seed 9: third in the batch, alone here
    assert not np.array_equal(first[0], first[1])  # different seeds, different images


def test_farm_image_equals_plain_diffusers_render(farm_env, aws, tiny_model):
    """The farm adds nothing to the pixels: the same model folder and parameters in plain diffusers."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    farm = farm_env.farm()
    job = farm.submit(
        "a white circle on a black background", negative_prompt="noise", seed=4242,
        width=64, height=64, steps=10, guidance_scale=7.0, scheduler="euler",
    )
    assert job.wait(timeout=300).succeeded
    result = job.results()[0]
    farm_pixels = pixels(farm.storage.get(result.storage_key))

    pipe = StableDiffusionPipeline.from_pretrained(
        result.model_path, safety_checker=None, requires_safety_checker=False, use_safetensors=True
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a white circle on a black background", negative_prompt="noise", num_inference_steps=10,
        guidance_scale=7.0, width=64, height=64, generator=torch.Generator("cpu").manual_seed(4242),
    ).images[0]
    direct = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert np.abs(farm_pixels - direct).max() <= 1


def test_long_prompt_is_accepted_and_its_truncation_recorded(farm_env, aws):
    farm = farm_env.farm()
    prompt = " ".join(["a red circle on a blue background"] * 20)  # ~140 tokens
    job = farm.submit(prompt, width=64, height=64, steps=2, seed=1)
    assert job.wait(timeout=300).succeeded
    result = job.results()[0]
    assert result.prompt_truncated is True and result.prompt_tokens > 75


def test_download_writes_pngs_and_metadata(farm_env, aws, tmp_path):
    farm = farm_env.farm()
    job = farm.submit("a yellow circle on a blue background", num_images=2, width=64, height=64, steps=3, seed=77)
    assert job.wait(timeout=300).succeeded
    paths = job.download(tmp_path)
    assert len(paths) == 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [row["seed"] for row in rows] == [77, 78]
    assert {row["file_name"] for row in rows} == {p.name for p in paths}


def test_cancel_drops_queued_images(farm_env, aws):
    farm = farm_env.farm()
    busy = farm.submit("a red square on a white background", num_images=8, width=128, height=128, steps=30, seed=5)
    later = farm.submit("a blue circle on a white background", num_images=4, width=64, height=64, steps=2, seed=5)
    assert later.cancel() == 4
    final = later.wait(timeout=300)
    assert final.counts[Status.canceled.value] == 4
    busy.wait(timeout=300)
    assert all(r.status == Status.canceled.value and r.storage_key is None for r in later.results())


def test_the_cli_submits_waits_and_downloads_as_a_user_would(farm_env, aws, tmp_path):
    submitted = farm_env.cli("submit", "--prompt", "a red circle on a blue background", "--num-images", "2",
                             "--width", "64", "--height", "64", "--steps", "3", "--seed", "42")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    waited = farm_env.cli("wait", job_id, "--no-progress", "--timeout", "300", timeout=320)
    assert waited.returncode == 0 and "2/2 finished" in waited.stdout, waited.stdout + waited.stderr
    downloaded = farm_env.cli("download", job_id, str(tmp_path / "out"))
    assert downloaded.returncode == 0 and "2 image(s)" in downloaded.stdout
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["00000-42.png", "00001-43.png"]

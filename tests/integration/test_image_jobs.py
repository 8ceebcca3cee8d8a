"""img2img and inpainting through the whole farm (PostgreSQL + Redis + S3 + a real worker)."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw

from farm.imaging.pnginfo import read_png_metadata
from farm.request.spec import ImageSpec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def farm_env(make_farm_env):
    env = make_farm_env("servers")
    env.start_worker("w1")
    return env


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def init_png(colour=(30, 60, 200)) -> bytes:
    image = Image.new("RGB", (96, 64), colour)
    ImageDraw.Draw(image).ellipse((30, 10, 66, 54), fill=(220, 30, 30))
    return png(image)


def mask_png() -> bytes:
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 47, 63), fill=255)
    return png(mask)


def test_img2img_and_inpainting_jobs_render_with_their_metadata(farm_env, s3_env, tmp_path):
    farm = farm_env.farm()
    (tmp_path / "init.png").write_bytes(init_png())
    job = farm.submit_many([
        {"prompt": "a red circle", "init_image": str(tmp_path / "init.png"), "strength": 0.6, "steps": 10, "num_images": 2, "seed": 1},
        {"prompt": "a green square", "init_image": str(tmp_path / "init.png"), "mask": mask_png(), "mask_blur": 2,
         "paste_back": True, "steps": 10, "seed": 5},
    ])
    final = job.wait(timeout=300)
    assert final.succeeded, [(r.status, r.error) for r in job.results()]
    results = job.results()
    assert [(r.width, r.height) for r in results] == [(96, 64)] * 3  # the init image's size
    parameters, spec = read_png_metadata(farm.storage.get(results[0].storage_key))
    assert "Denoising strength: 0.6" in parameters and spec["mode"] == "img2img"
    assert spec["init_image_key"].startswith("inputs/")
    parameters, spec = read_png_metadata(farm.storage.get(results[2].storage_key))
    assert "Denoising strength: 1" in parameters and "Mask blur: 2" in parameters
    assert spec["mode"] == "inpaint" and spec["mask_key"].startswith("inputs/")
    # paste-back: the unmasked right half is the original, exactly (the blur reaches 2 px past the edge)
    out = Image.open(io.BytesIO(farm.storage.get(results[2].storage_key))).convert("RGB")
    original = Image.open(io.BytesIO(init_png())).convert("RGB")
    assert out.crop((56, 0, 96, 64)).tobytes() == original.crop((56, 0, 96, 64)).tobytes()


def test_a_corrupt_stored_input_fails_its_job_only(farm_env, s3_env):
    farm = farm_env.farm()
    good, bad = init_png((10, 200, 10)), init_png((200, 200, 10))
    # the second image's stored object is damaged (as by a bad disk or a partial copy): the client
    # finds the key present and does not upload it again, so the worker fetches the damaged bytes
    from farm.imaging.inputs import prepare_image

    bad_key = prepare_image(bad, field="init_image", limits=farm.settings.limits).key
    farm.storage.put(bad_key, bad[:100], content_type="image/png")
    # both in one GPU batch (same parameters), each with its own init image
    job = farm.submit_many([
        {"prompt": "a red circle", "init_image": good, "strength": 0.5, "steps": 4, "seed": 1},
        {"prompt": "a red circle", "init_image": bad, "strength": 0.5, "steps": 4, "seed": 2},
    ])
    final = job.wait(timeout=300)
    first, second = job.results()
    assert first.status == "succeeded", first.error
    assert second.status == "failed" and "does not match its hash" in second.error
    # the worker goes on serving
    assert farm.submit("a blue square", width=64, height=64, steps=2, seed=3).wait(timeout=120).succeeded
    assert final.counts["failed"] == 1


def test_a_campaign_row_with_a_lora_and_an_init_image_renders_like_the_same_plain_request(farm_env, s3_env, tmp_path, tiny_model):
    """Bulk synthesis takes everything a plain request takes: a prompt file row names a LoRA with a
    weight and an init image by a path relative to the file, and renders through the farm with the
    very parameters the same plain request gets."""
    from evaluation.tiny_lora import make_tiny_lora

    farm = farm_env.farm()
    farm.add_lora(make_tiny_lora(tiny_model, tmp_path / "ink.safetensors", seed=3), name="ink-row")
    folder = tmp_path / "prompts"
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "start.png").write_bytes(init_png())
    (folder / "rows.csv").write_text(
        "prompt,init_image,loras,strength,clip_skip,steps,seed\n"
        "a red circle,inputs/start.png,ink-row:0.7,0.6,2,8,11\n"
    )
    campaign = farm.campaign("row-with-lora-and-image")
    report = campaign.submit(folder / "rows.csv")
    assert report.new == 1
    campaign.wait(timeout=300)
    [row] = list(campaign.images())
    assert row.status == "succeeded", row.error
    assert row.mode == "img2img" and row.strength == 0.6 and row.clip_skip == 2 and row.steps == 8
    assert [weight for _, weight in row.loras] == [0.7] and row.info["loras"][0]["weight"] == 0.7

    plain = farm.submit("a red circle", init_image=str(folder / "inputs" / "start.png"), loras=["ink-row:0.7"],
                        strength=0.6, clip_skip=2, steps=8, seed=11)
    [image] = plain.results()
    asked = lambda r: {k: v for k, v in r.metadata().items() if k in ImageSpec.__dataclass_fields__}  # noqa: E731
    assert asked(image) == asked(row)
    final = plain.wait(timeout=300)
    assert final.succeeded
    assert farm.storage.get(plain.results()[0].storage_key)[:8] == b"\x89PNG\r\n\x1a\n"

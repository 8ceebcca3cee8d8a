"""LoRA jobs through the farm: 3 workers, 6 LoRAs, caches and affinity routing (PostgreSQL + Redis + S3)."""

from __future__ import annotations

from collections import Counter

import pytest

pytestmark = pytest.mark.integration

NAMES = [f"style-{c}" for c in "abcdef"]


@pytest.fixture(scope="module")
def farm_env(make_farm_env, tiny_model, tmp_path_factory):
    env = make_farm_env("servers", FARM_LORA_MAX_LOADED="2", FARM_AFFINITY_MAX_BACKLOG="2")
    from evaluation.tiny_lora import make_tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    farm = env.farm()
    for n, name in enumerate(NAMES):
        farm.add_lora(make_tiny_lora(tiny_model, folder / f"{name}.safetensors", seed=n + 1,
                                     layout="kohya" if n % 2 else "diffusers"), name=name)
    for node in ("w1", "w2", "w3"):
        env.start_worker(node)
    return env


def job(farm, name: str, seed: int):
    return farm.submit("a red circle on a blue background", width=64, height=64, steps=3, seed=seed,
                       loras=[{"name": name, "weight": 0.8}])


def served(result) -> str:
    return result.info["loras"][0]["served"]


def test_images_record_how_their_loras_were_served(farm_env, s3_env):
    farm = farm_env.farm()
    first = job(farm, "style-a", 1)
    assert first.wait(timeout=300).succeeded, [r.error for r in first.results()]
    (result,) = first.results()
    assert served(result) == "download" and result.info["loras"][0]["weight"] == 0.8
    again = job(farm, "style-a", 2)
    assert again.wait(timeout=300).succeeded
    assert served(again.results()[0]) in ("cache", "download", "disk")


def test_most_jobs_land_on_a_warm_worker(farm_env, s3_env):
    farm = farm_env.farm()
    # warm up: every LoRA once (each worker holds at most 2 loaded)
    for n, name in enumerate(NAMES):
        assert job(farm, name, 100 + n).wait(timeout=300).succeeded
    # a stream cycling over the six LoRAs, one job at a time as interactive users send them
    results = []
    for n in range(24):
        one = job(farm, NAMES[n % 6], 200 + n)
        assert one.wait(timeout=300).succeeded
        results.append(one.results()[0])
    counts = Counter(served(r) for r in results)
    assert counts["cache"] >= 0.9 * len(results), counts  # measured: 24 of 24


def test_a_backed_up_warm_worker_does_not_starve_the_others(farm_env, s3_env):
    farm = farm_env.farm()
    assert job(farm, "style-f", 1).wait(timeout=300).succeeded  # some worker is now warm for f
    # twelve tasks (guidance differs, so each is its own batch) all wanting the one warm LoRA: the
    # warm worker's queue takes two, the shared queue the rest, so the other workers help
    spread = farm.submit_many([
        {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "seed": n, "guidance_scale": 5 + n * 0.25,
         "loras": [{"name": "style-f", "weight": 0.8}]}
        for n in range(12)
    ])
    assert spread.wait(timeout=300).succeeded
    by_worker = Counter(r.worker.split("/")[0] for r in spread.results())
    assert len(by_worker) >= 2, f"all twelve tasks waited for one warm worker: {by_worker}"


def test_a_damaged_stored_lora_fails_its_job_with_the_reason_and_the_worker_goes_on(farm_env, s3_env, tiny_model, tmp_path):
    from evaluation.tiny_lora import make_tiny_lora

    farm = farm_env.farm()
    record = farm.add_lora(make_tiny_lora(tiny_model, tmp_path / "fragile.safetensors", seed=77), name="fragile")
    data = farm.storage.get(record.storage_key)
    farm.storage.put(record.storage_key, data[: len(data) // 2], content_type="application/octet-stream")
    broken = job(farm, "fragile", 1)
    final = broken.wait(timeout=300)
    (result,) = broken.results()
    assert final.counts["failed"] == 1 and "LoraError" in result.error and "sha256" in result.error.lower()
    assert job(farm, "style-a", 9).wait(timeout=300).succeeded  # the worker keeps serving

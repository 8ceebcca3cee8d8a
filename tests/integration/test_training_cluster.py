"""A LoRA training job survives its worker's death on real servers (PostgreSQL + Redis + moto S3, real
`farm worker --cpu` processes, the shipped shapes model): submitted with `farm train lora`, its worker's
whole process group SIGKILLed after a checkpoint, another worker started — its supervisor's reconciler
(step 5) takes the expired lease back and publishes the job, which resumes from the checkpoint (not from
step 0), ends `succeeded`, registers the LoRA, and a render naming it succeeds; the same job run
again uninterrupted ends with the same weights (within 1e-4). Nobody types `farm train recover`.

Prints one JSON line of timings (docs/training.md quotes them)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import numpy as np
import pytest

from evaluation import shape_data as S

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 120, 10  # long enough that a quiet box is still training when the kill lands




def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status(env, name: str) -> dict:
    shown = env.cli("train", "status", name)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout.strip().splitlines()[-1])


def lora_tensors(env, name: str) -> dict:
    """The registered LoRA's tensors (float32 numpy), read back from the farm's storage."""
    from safetensors.numpy import load
    from sqlalchemy import select

    from farm.db.tables import LoraRecord

    with env.farm() as farm:
        with farm.sessions() as session:
            key = session.scalar(select(LoraRecord.storage_key).where(LoraRecord.name == name))
        assert key, f"no LoRA named {name!r}"
        return {k: v.astype(np.float32) for k, v in load(farm.services.storage.get(key)).items()}


def row(env, name: str):
    from sqlalchemy import select

    from farm.db.tables import TrainingJobRecord

    with env.farm() as farm, farm.sessions() as session:
        return session.scalar(select(TrainingJobRecord).where(TrainingJobRecord.name == name))


def test_a_killed_training_worker_costs_only_the_steps_since_its_checkpoint(
    make_farm_env, s3_env, tmp_path, scrape_port, scrape_exporter
) -> None:
    port = _free_port()  # each worker in turn serves its metrics there (the first is dead when the second starts)
    env = make_farm_env(
        "servers",
        FARM_MODELS="shapes=builtin:shapes",
        FARM_DEFAULT_MODEL="shapes",
        FARM_CLAIM_LEASE_SECONDS="10",
        FARM_RECONCILE_INTERVAL="1",
        FARM_RECONCILE_GRACE_SECONDS="2",
        # a SIGKILLed worker's LoRA advert outlives it by up to this TTL, and cold renders may be routed to
        # its own queue until the reconciler moves them back (default 120 s: the render below would wait)
        FARM_ADVERT_TTL="10",
        FARM_WORKER_METRICS_PORT=str(port),
        FARM_WORKER_METRICS_HOST="127.0.0.1",
    )
    times: dict[str, float] = {}
    began = time.monotonic()
    first = env.start_worker("t1")
    times["worker_ready_s"] = round(time.monotonic() - began, 1)

    folder = S.write_imagefolder(tmp_path / "data")
    submit_start = time.monotonic()
    submitted = env.cli("train", "lora", "--name", "healed", "--data", str(folder), "--model", "shapes",
                        "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--batch-size", "4", "--rank", "2",
                        "--resolution", "64", "--lr", "1e-3", "--seed", "5")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout.strip().splitlines()[-1])["state"] == "queued"
    submit_at = time.monotonic()
    times["submit_cli_s"] = round(submit_at - submit_start, 1)

    # wait for a checkpoint, then kill the worker holding the job: its render child and its supervisor
    deadline = time.monotonic() + 240
    while True:
        job = row(env, "healed")
        # a few steps past a checkpoint (the row's step is renewed every second): those are what the kill costs
        if job.checkpoint_step and job.checkpoint_step >= EVERY and job.step > job.checkpoint_step:
            break
        assert job.state != "succeeded", "the job finished before the kill: make STEPS longer for this machine"
        assert job.state in ("queued", "running") and time.monotonic() < deadline, (job.state, job.error, env.worker_log("t1")[-3000:])
        time.sleep(0.05)
    assert job.worker.startswith("t1@test/"), job.worker
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    killed_at = time.monotonic()
    times["first_checkpoint_s"] = round(killed_at - submit_at, 1)
    after_kill = row(env, "healed")
    checkpoint = after_kill.checkpoint_step
    assert after_kill.state == "running" and 0 < checkpoint < STEPS, (after_kill.state, checkpoint)
    times["killed_at_step"], times["checkpoint_step"] = after_kill.step, checkpoint
    assert after_kill.step > checkpoint

    # another worker: its supervisor's reconciler takes the expired lease back and publishes the job
    env.start_worker("t2")
    times["second_worker_ready_s"] = round(time.monotonic() - killed_at, 1)
    deadline = time.monotonic() + 300
    seen = None  # the metrics while the second attempt trains: the worker's gauges and the exporter's
    while True:
        found = status(env, "healed")
        if found["state"] not in ("queued", "running"):
            break
        # the row keeps the dead attempt's step until the new one's first heartbeat: wait until it is past it
        # (and well before its end: a scrape that lands after the job finished would see it stopped)
        if seen is None and found["state"] == "running" and after_kill.step < found["step"] < STEPS - 3 * EVERY:
            worker, farm_wide = scrape_port(port), scrape_exporter(env.farm().services)
            seen = {
                "row_step": found["step"],
                "step": worker.value("farm_worker_training_step", worker="t2@test", job="healed", model="shapes"),
                "total": worker.value("farm_worker_training_total_steps", worker="t2@test", job="healed", model="shapes"),
                "loss": worker.value("farm_worker_training_loss", worker="t2@test", job="healed", model="shapes"),
                "running": worker.value("farm_worker_training_running", worker="t2@test", job="healed", model="shapes"),
                "jobs_running": farm_wide.value("farm_training_jobs", model="shapes", state="running"),
                "farm_step": farm_wide.value("farm_training_step", job="healed", model="shapes"),
                "farm_total": farm_wide.value("farm_training_total_steps", job="healed", model="shapes"),
            }
        assert time.monotonic() < deadline, (found, env.worker_log("t2")[-4000:])
        time.sleep(0.5)
    times["healed_s"] = round(time.monotonic() - killed_at, 1)
    assert found["state"] == "succeeded", (found, env.worker_log("t2")[-4000:])
    assert found["step"] == STEPS and found["error"] is None
    assert seen is not None, "no scrape while the second attempt trained"
    assert seen["total"] == STEPS and seen["running"] == 1 and seen["row_step"] <= seen["step"] <= STEPS and seen["loss"] > 0, seen
    assert seen["jobs_running"] == 1 and seen["farm_total"] == STEPS and seen["row_step"] <= seen["farm_step"] <= STEPS, seen
    assert found["worker"].startswith("t2@test/"), found["worker"]
    assert found["attempts"] == 2, found
    assert found["lora"]["name"] == "healed" and found["lora"]["base"] == "shapes"
    done = row(env, "healed")
    assert done.info["resumed_from"] == [checkpoint], done.info  # resumed at the checkpoint, not at 0
    assert f"resumes at step {checkpoint}" in env.worker_log("t2")

    # the LoRA is registered and a render naming it succeeds
    listed = env.cli("lora", "list")
    assert listed.returncode == 0 and "healed" in listed.stdout, listed.stdout + listed.stderr
    render_start = time.monotonic()
    with env.farm() as farm:
        render = farm.submit("a red circle on a blue background", model="shapes", steps=4, seed=1,
                             loras=[{"name": "healed", "weight": 1.0}])
        assert render.wait(timeout=180).succeeded, [r.error for r in render.results()]
    times["render_s"] = round(time.monotonic() - render_start, 1)

    # the same job never interrupted ends where the killed one did (steps draw their noise from
    # (seed, step); the resumed attempt restored weights, optimizer state and loss history)
    reference_start = time.monotonic()
    submitted = env.cli("train", "lora", "--name", "reference", "--data", str(folder), "--model", "shapes",
                        "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--batch-size", "4", "--rank", "2",
                        "--resolution", "64", "--lr", "1e-3", "--seed", "5")
    assert submitted.returncode == 0, submitted.stderr
    deadline = time.monotonic() + 300
    while (reference := status(env, "reference"))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, (reference, env.worker_log("t2")[-4000:])
        time.sleep(0.5)
    assert reference["state"] == "succeeded" and reference["attempts"] == 1, reference
    times["uninterrupted_s"] = round(time.monotonic() - reference_start, 1)
    healed, uninterrupted = lora_tensors(env, "healed"), lora_tensors(env, "reference")
    assert healed.keys() == uninterrupted.keys() and healed
    worst = max(float(np.max(np.abs(healed[k] - uninterrupted[k]))) for k in healed)
    scale = max(float(np.max(np.abs(uninterrupted[k]))) for k in uninterrupted)
    assert worst <= 1e-4 * max(scale, 1.0), (worst, scale)
    times["max_abs_diff_vs_uninterrupted"] = worst
    times["total_s"] = round(time.monotonic() - began, 1)
    print(json.dumps({"training_cluster": times, "train_seconds_second_attempt": done.info.get("train_seconds")}))

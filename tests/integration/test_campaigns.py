"""Campaigns on PostgreSQL + Redis + S3 with a real worker: sweep, resume, control, export."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from farm.db.tables import CampaignRecord, ImageRecord, Status, SubmissionRecord

pytestmark = pytest.mark.integration

PROMPTS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow")
           for s in ("circle", "square", "triangle", "cross") for b in ("white", "black")]  # 32 prompts
SWEEPS = ["seed=1,2,3", "guidance_scale=5,7.5"]


@pytest.fixture(scope="module")
def farm_env(make_farm_env, tiny_model):
    # "idle" has no worker: its images stay queued, for tests about records, not rendering
    env = make_farm_env("servers", FARM_MODELS=f"tiny={tiny_model},idle={tiny_model}")
    env.start_worker("w1")
    return env


def write_csv(path: Path, prompts: list[str], **extra) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "width", "height", "steps", *extra])
        for prompt in prompts:
            writer.writerow([prompt, 64, 64, 3, *extra.values()])
    return path


def count(farm, campaign: str, status: Status | None = None) -> int:
    with farm.sessions() as session:
        query = select(func.count()).select_from(ImageRecord).join(CampaignRecord).where(CampaignRecord.name == campaign)
        if status is not None:
            query = query.where(ImageRecord.status == status.value)
        return session.scalar(query)


def test_csv_sweep_renders_exports_and_resubmits_without_duplicates(farm_env, s3_env, tmp_path):
    farm = farm_env.farm()
    source = write_csv(tmp_path / "prompts.csv", PROMPTS)
    campaign = farm.campaign("shapes-sweep")

    dry = campaign.submit(source, sweeps=SWEEPS, dry_run=True)
    assert dry.total == 32 * 3 * 2 and dry.estimated_gpu_seconds > 0
    assert count(farm, "shapes-sweep") == 0

    report = campaign.submit(source, sweeps=SWEEPS)
    assert (report.total, report.new, report.existing) == (192, 192, 0)
    final = campaign.wait(timeout=600)
    assert final.counts["succeeded"] == 192, str(final)

    again = campaign.submit(source, sweeps=SWEEPS)
    assert (again.new, again.existing) == (0, 192)
    assert count(farm, "shapes-sweep") == 192

    recorded = {(r.prompt, r.seed, r.guidance_scale) for r in campaign.images()}
    assert recorded == {(p, s, g) for p in PROMPTS for s in (1, 2, 3) for g in (5.0, 7.5)}

    # imagefolder, loaded by Hugging Face datasets
    import datasets

    folder = tmp_path / "imagefolder"
    assert campaign.export(str(folder), fmt="imagefolder").exported == 192
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert len(ds) == 192
    assert Counter(ds["text"]) == Counter({p: 6 for p in PROMPTS})
    seeds = {r.id: r.seed for r in campaign.images()}
    assert all(seeds[row["image_id"]] == row["seed"] for row in ds.remove_columns("image"))
    assert ds[0]["image"].size == (64, 64)
    assert campaign.export(str(folder), fmt="imagefolder").exported == 0  # nothing twice
    assert len(datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")) == 192

    # WebDataset shards in S3, read back with the webdataset package
    import webdataset as wds

    bucket = farm.storage.bucket
    dest = f"s3://{bucket}/exports/shapes"
    assert campaign.export(dest, fmt="webdataset", shard_size=50).exported == 192
    assert campaign.export(dest, fmt="webdataset", shard_size=50).exported == 0
    local = tmp_path / "shards"
    local.mkdir()
    listed = farm.storage.client.list_objects_v2(Bucket=bucket, Prefix="exports/shapes/")
    shards = sorted(o["Key"] for o in listed["Contents"] if o["Key"].endswith(".tar"))
    assert len(shards) == 4  # 50 + 50 + 50 + 42
    for key in shards:
        farm.storage.client.download_file(bucket, key, str(local / Path(key).name))
    samples = list(wds.WebDataset([str(p) for p in sorted(local.glob("*.tar"))], shardshuffle=False))
    assert len(samples) == 192
    for sample in samples:
        meta = json.loads(sample["json"])
        assert seeds[sample["__key__"]] == meta["seed"]
        assert sample["txt"].decode() == meta["text"] and sample["png"].startswith(b"\x89PNG")

    sheet = campaign.contact_sheet(tmp_path / "sheet.png", sample=8)
    assert sheet.stat().st_size > 1000


def test_killed_submitter_resumes_without_duplicates(farm_env, s3_env, tmp_path):
    """A campaign submit is all or nothing: killed while it checks and writes, it leaves nothing;
    committed while the broker refuses, everything is recorded and queued later, once, without a
    person (the reconciler; here the next submit of the same file, which adds nothing)."""
    farm = farm_env.farm()
    prompts = [f"prompt number {i}" for i in range(400)]
    source = write_csv(tmp_path / "big.csv", prompts)
    rows = (tmp_path / "big.csv").read_text().splitlines()
    with open(tmp_path / "big.csv", "w") as handle:  # all on the idle model: nothing renders them
        handle.write(rows[0] + ",model\n" + "".join(f"{r},idle\n" for r in rows[1:]))
    env = {**farm_env.process_env(), "FARM_CAMPAIGN_CHUNK_SIZE": "20"}
    command = [sys.executable, "-m", "farm", "campaign", "submit", str(source), "--name", "resume-me", "--sweep", "seed=1,2"]

    # killed half way through: the transaction never committed, nothing is left behind
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = count(farm, "resume-me")
    assert killed_at in (0, 800)  # never a partial campaign (0 unless this machine was fast)

    # the broker refuses after the commit: recorded, said so, exit 0
    refused = subprocess.run(command, env={**env, "FARM_BROKER_URL": "redis://127.0.0.1:1/0"},
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 0, refused.stderr
    assert count(farm, "resume-me") == 800
    if killed_at == 0:  # this run recorded them and could not queue them
        assert "the broker refused" in refused.stdout and "the farm queues them when it answers" in refused.stdout

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "0 new, 800 already there" in result.stdout, result.stdout
    # what the refused run could not queue is queued now: by this submit, or already by the running
    # worker's reconciler (the outbox), whichever came first
    from farm.dispatch.broker_state import BrokerState

    with farm.sessions() as session:
        tasks = set(session.scalars(
            select(ImageRecord.task_id).join(CampaignRecord).where(CampaignRecord.name == "resume-me")
        ))
    assert tasks <= BrokerState(farm.settings).task_ids()
    with farm.sessions() as session:
        unpublished = session.scalar(
            select(func.count()).select_from(SubmissionRecord).join(CampaignRecord)
            .where(CampaignRecord.name == "resume-me", SubmissionRecord.published_at.is_(None))
        )
        distinct = session.scalar(
            select(func.count(func.distinct(ImageRecord.item_key))).select_from(ImageRecord).join(CampaignRecord)
            .where(CampaignRecord.name == "resume-me")
        )
    assert unpublished == 0 and distinct == 800
    farm.campaign("resume-me").cancel()


def test_pause_resume_cancel_and_retry_failed_are_counted(farm_env, s3_env, tmp_path):
    farm = farm_env.farm()
    idle = farm.campaign("controls")
    idle.submit([{"prompt": f"p{i}", "width": 64, "height": 64, "steps": 2, "model": "idle"} for i in range(30)])
    assert idle.pause() == 30
    assert idle.status().counts["paused"] == 30 and idle.status().state == "paused"
    assert idle.resume() == 30
    assert idle.status().counts["queued"] == 30
    assert idle.cancel() == 30
    status = idle.status()
    assert status.counts["canceled"] == 30 and status.state == "canceled"

    live = farm.campaign("retry")
    live.submit([{"prompt": f"q{i}", "width": 64, "height": 64, "steps": 2, "seed": i} for i in range(10)])
    assert live.wait(timeout=300).counts["succeeded"] == 10
    with farm.sessions.begin() as session:  # as if four renders had failed
        ids = session.scalars(select(ImageRecord.id).join(CampaignRecord).where(CampaignRecord.name == "retry").limit(4)).all()
        session.execute(update(ImageRecord).where(ImageRecord.id.in_(ids)).values(status="failed", error="CUDA error: boom"))
    status = live.status()
    assert status.counts["failed"] == 4 and status.failures == {"render": (4, "CUDA error: boom")}
    assert live.retry_failed() == 4
    final = live.wait(timeout=300)
    assert final.counts["succeeded"] == 10 and final.counts["failed"] == 0


def test_interactive_job_is_not_stuck_behind_a_campaign(farm_env, s3_env):
    farm = farm_env.farm()
    big = farm.campaign("big-batch")
    big.submit([{"prompt": f"background work {i}", "width": 64, "height": 64, "steps": 6, "seed": i} for i in range(400)])
    time.sleep(1.0)
    small = farm.submit("an urgent yellow circle", width=64, height=64, steps=2, seed=1)
    assert small.wait(timeout=300).succeeded
    left = big.status()
    assert left.counts["queued"] > 100, f"the small job waited for most of the campaign: {left}"
    big.cancel()

"""Submission throughput: a 100k-image campaign against local PostgreSQL + Redis, vs the naive way.

    python bench/submit.py [--images 100000] [--naive-images 5000]

The farm's way streams a CSV, validates it, writes records in bulk and publishes grouped tasks
(8 images each) over one connection. The naive way, in the same run, writes each image in its own
transaction and calls ``apply_async`` once per image; it is timed on ``--naive-images`` images
(its rate does not depend on the total). Uses a fresh database and Redis db 12, removed afterwards.
Prints, as its last line, one JSON object: images, seconds, images_per_s, naive_images_per_s.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, insert, text

from farm.dispatch.celery_app import RENDER_TASK
from farm.client import Farm
from farm.db.tables import ImageRecord, SubmissionRecord, utcnow
from farm.settings import Settings

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/12"


def naive(farm: Farm, count: int) -> float:
    """One transaction and one apply_async per image."""
    started = time.perf_counter()
    submission_id = str(uuid.uuid4())
    with farm.sessions.begin() as session:
        session.add(SubmissionRecord(id=submission_id, num_images=count, num_requests=count))
    task = farm.celery.signature(RENDER_TASK)
    for i in range(count):
        image_id = str(uuid.uuid4())
        with farm.sessions.begin() as session:
            session.execute(insert(ImageRecord), [{
                "id": image_id, "submission_id": submission_id, "position": i, "request_index": i, "model": "tiny",
                "prompt": f"naive prompt {i}", "negative_prompt": "", "seed": i, "steps": 25, "guidance_scale": 7.5,
                "width": 512, "height": 512, "scheduler": "dpmpp_2m", "params": {}, "status": "queued",
                "attempts": 0, "queued_at": utcnow(), "task_id": image_id,
            }])
        task.apply_async(kwargs={"image_ids": [image_id], "model": "tiny"}, task_id=image_id,
                         queue=farm.settings.queue_for("tiny"))
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--naive-images", type=int, default=5000)
    args = parser.parse_args()

    name = f"farm_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    prefix = f"farmbench{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="farm-bench-"))
    settings = Settings(
        data_dir=tmp, database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", broker_url=REDIS,
        queue_prefix=prefix,
    )
    try:
        from farm import db

        db.upgrade(db.make_engine(settings.database))
        source = tmp / "prompts.csv"
        with open(source, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["prompt", "seed"])
            for i in range(args.images):
                writer.writerow([f"a {('red', 'green', 'blue')[i % 3]} shape number {i} on a plain background", i])
        with Farm(settings) as farm:
            farm.celery.connection_for_write().ensure_connection()
            started = time.perf_counter()
            report = farm.campaign("bench").submit(source)
            seconds = time.perf_counter() - started
            assert report.new == args.images, report
            print(f"farm: {args.images} images in {seconds:.2f} s ({args.images / seconds:.0f} images/s)")
            naive_rate = naive(farm, args.naive_images)
            print(f"naive: {naive_rate:.0f} images/s (one transaction + one apply_async per image)")
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({
            "images": args.images, "seconds": round(seconds, 3), "images_per_s": round(args.images / seconds, 1),
            "naive_images_per_s": round(naive_rate, 1), "speedup": round(args.images / seconds / naive_rate, 1),
            "peak_rss_mb": round(peak_mb, 1),
        }))
    finally:
        import redis

        client = redis.Redis.from_url(REDIS)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()

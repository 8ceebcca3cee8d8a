"""bench/control_plane.py runs end to end at tiny scale: 2 simulated workers, 16 images, through the
real worker code against this session's PostgreSQL, Redis and moto S3 server. No timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "control_plane.py"


def test_control_plane_bench_runs_end_to_end(pg_database: str, redis_url: str, s3_server: str) -> None:
    result = subprocess.run(
        [
            sys.executable, str(BENCH), "--workers", "2", "--images", "16", "--batch-seconds", "0.2", "--steps", "5",
            "--size", "64", "--upload-threads", "2", "--db-pool", "3", "--timeout", "120",
            "--database-url", pg_database, "--redis-url", redis_url, "--s3-endpoint", s3_server,
        ],
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["max_images_per_s"] > 0
    assert summary["db_transactions_per_image"] > 0
    (row,) = summary["rows"]
    assert row["workers"] == 2 and row["complete"] is True
    assert row["recorded"] == 16 and row["chunks"] == 2  # two tasks of 8, each claimed once
    assert row["s3_calls_per_image"]["PutObject"] >= 1.0  # one PUT per image (a retry may add one)
    assert row["db_transactions_per_chunk"] >= 2  # at least a claim and a record
    assert row["redis_commands_per_image"] > 0
    assert row["claim_ms_p50"] is not None

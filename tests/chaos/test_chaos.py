"""The short chaos campaign (bench/chaos.py --short): a campaign survives the infrastructure failing.

~100 images on 3 real CPU workers (PostgreSQL behind a fault proxy, the harness's own Redis, moto S3
behind a fault proxy) while workers are SIGKILLed, Redis restarts empty, S3 stalls and refuses,
PostgreSQL is cut, a submitter is killed between its commit and its publish, a worker's process
group is SIGTERMed and poison messages land in the queue. Every asked image must succeed, once,
without anybody stepping in. See docs/reliability.md.

The harness says when a failure is its own (``verdict: harness-error``: a service it could not
start, a fault it could not apply): the test fails then too, with that reason, not as a farm bug.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# `chaos` is not a registered marker (pyproject.toml): integration + slow select it for now
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]


@pytest.mark.timeout(660)
def test_short_chaos_campaign_loses_nothing_and_duplicates_nothing(tmp_path):
    artifacts = tmp_path / "artifacts"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "chaos.py"), "--short", "--artifacts", str(artifacts)],
        capture_output=True, text=True, timeout=630, cwd=REPO,
    )
    lines = run.stdout.strip().splitlines()
    assert lines, f"bench/chaos.py printed no result (exit {run.returncode}):\n{run.stderr[-4000:]}"
    result = json.loads(lines[-1])
    where = f"(logs, image table, fault timeline: {artifacts})"

    assert result["verdict"] != "harness-error", f"the HARNESS failed, not the farm: {result['harness_errors']} {where}"
    assert not result["faults"]["not_applied"], f"faults never applied: {result['faults']['not_applied']} {where}"
    summary = {k: result.get(k) for k in ("asked", "succeeded", "failed", "lost", "lost_detail", "duplicate_results",
                                          "duplicate_objects", "manual_steps", "stalls", "poison", "evidence")}
    assert result["lost"] == 0, f"images lost: {summary} {where}"
    assert result["succeeded"] == result["asked"], f"not every asked image succeeded: {summary} {where}"
    assert result["duplicate_results"] == 0, f"an image recorded more than once: {summary} {where}"
    assert result["duplicate_objects"] == 0, f"more objects than succeeded images: {summary} {where}"
    assert result["manual_steps"] == 0, f"the harness had to step in: {result['unexpected_supervisor_exits']} {where}"
    # a poison message still queued or unacked is one that the next worker start meets again
    assert result["poison"]["left_in_queues_or_unacked"] == 0, f"poison not dealt with: {result['poison']} {where}"
    assert result["verdict"] == "pass", summary
    assert run.returncode == 0

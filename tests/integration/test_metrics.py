"""Both metrics endpoints scraped from a running farm (PostgreSQL, Redis, S3, a real worker) and read
with Prometheus's own text parser: the worker's (images, phases, up) and the exporter's (queue depth
over every priority sub-queue, images by status, failures by reason class)."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_worker_metrics_count_images_and_time_every_phase(make_farm_env, scrape_port) -> None:
    port = _free_port()
    env = make_farm_env("servers", FARM_WORKER_METRICS_PORT=str(port), FARM_WORKER_METRICS_HOST="127.0.0.1")
    env.start_worker("metrics")
    try:
        deadline = time.monotonic() + 60  # a readiness probe: 503 while the model loads, then 200
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
                    assert answer.status == 200
                    break
            except urllib.error.HTTPError as exc:
                assert exc.code == 503 and time.monotonic() < deadline, [s for s in scrape_port(port).samples if "ready" in s.name]
                time.sleep(0.5)
        farm = env.farm()
        job = farm.submit_many([{"prompt": "a red circle", "num_images": 3, "width": 64, "height": 64, "steps": 3}])
        job.wait(timeout=180)
        deadline = time.monotonic() + 30
        while True:  # uploads and records finish after the task returns
            scrape = scrape_port(port)
            if scrape.value("farm_worker_phase_seconds_count", phase="record") >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        env.stop_workers()
    worker = "metrics@test"
    assert scrape.value("farm_worker_up", worker=worker) == 1
    assert scrape.value("farm_worker_restarts_total", worker=worker) == 0
    assert scrape.value("farm_spool_limit_bytes", worker=worker) == env.settings.spool_bytes
    assert scrape.value("farm_worker_images_total", worker=worker, outcome="rendered") == 3
    for phase in ("queue_wait", "claim", "inputs", "text_encode", "denoise", "vae_decode", "png_encode", "upload", "record"):
        assert scrape.value("farm_worker_phase_seconds_count", worker=worker, phase=phase) >= 1, phase
    assert scrape.value("farm_worker_chunk_images_sum", worker=worker) == 3


def test_exporter_counts_every_priority_sub_queue(make_farm_env, scrape_exporter) -> None:
    env = make_farm_env("servers")
    farm = env.farm()
    farm.submit_many([{"prompt": "now", "width": 64, "height": 64}])  # priority 0: the plain queue
    report = farm.campaign("metrics-campaign").submit([{"prompt": f"later {i}", "steps": 5 + i} for i in range(3)])
    assert report.new == 3  # campaign priority 6: the queue's ':6' sub-queue
    scrape = scrape_exporter(farm.services)
    assert scrape.value("farm_queue_depth", model="tiny") == 4
    assert scrape.value("farm_images", model="tiny", status="queued") == 4
    assert scrape.value("farm_campaign_images", campaign="metrics-campaign", status="queued") == 3
    assert scrape.value("farm_up", component="broker") == 1
    assert scrape.value("farm_up", component="database") == 1

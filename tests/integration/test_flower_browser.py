"""Flower tells the truth, seen in a real browser: headless Debian Chromium driven by Playwright
(never a browser download) against a running farm (PostgreSQL, Redis, S3, a real worker) and
`farm flower` with basic auth.

- a task whose image failed shows FAILURE with the image's reason;
- a running task shows its denoising step;
- the worker is listed by its name.

Screenshots go to ``$FARM_TEST_ARTIFACTS/flower`` (default: the test's temp folder) and are kept.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
USER, PASSWORD = "ops", "flower-test-secret"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FARM_TEST_ARTIFACTS", tmp_path)) / "flower"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _start_flower(env, port: int) -> subprocess.Popen:
    log = open(env.tmp / "flower.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "farm", "flower", f"--port={port}"],
        env={**env.process_env(), "FARM_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2).read()
            return process
        except (urllib.error.URLError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((env.tmp / "flower.log").read_text(errors="replace")[-3000:])
            time.sleep(0.3)


def test_flower_shows_failures_progress_and_workers(make_farm_env, artifacts) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: ./scripts/setup installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    env = make_farm_env("servers")
    port = _free_port()
    flower = _start_flower(env, port)  # before the worker: it sees every event
    try:
        # without credentials Flower answers 401
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/tasks", timeout=5)
        assert refused.value.code == 401

        farm = env.farm()
        # an image whose stored input vanished before a worker took it: it fails, with its reason
        broken = farm.submit_many([{"prompt": "a broken input", "init_image": _png(), "width": 64, "height": 64}])
        [key] = {r.init_image_key for r in broken.results()}
        farm.storage.delete(key)
        # named and described from the moment it is queued (a task-sent event), before any worker runs
        waiting = _flower_task(port, _task_id(farm, broken.id))
        assert waiting["name"] == "farm.render" and "a broken input" in waiting["kwargs"], waiting
        env.start_worker("flower")
        broken.wait(timeout=180)
        assert broken.status().counts["failed"] == 1
        # slow enough to be seen running (~30 s here: 6 images at 64² rendered in 5.7 s on a quiet box,
        # done before the page looked; progress events come at most every 0.5 s)
        slow = farm.submit_many([{"prompt": "a slow green square", "steps": 150, "num_images": 8, "width": 128, "height": 128}])

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_context(http_credentials={"username": USER, "password": PASSWORD}).new_page()
            base = f"http://127.0.0.1:{port}"

            # the worker, by its name
            page.goto(f"{base}/workers")
            page.wait_for_selector("text=flower@test", timeout=30_000)
            page.screenshot(path=str(artifacts / "workers.png"), full_page=True)

            # the failed task: FAILURE, with the image's reason
            failed_task = _task_id(farm, broken.id)
            page.goto(f"{base}/task/{failed_task}")
            page.wait_for_selector("text=FAILURE", timeout=30_000)
            body = page.inner_text("body")
            page.screenshot(path=str(artifacts / "failed-task.png"), full_page=True)
            assert "1 of 1 image(s) failed" in body and ("input" in body or "storage" in body), body[:3000]

            # the running task: its step, live
            running_task = _task_id(farm, slow.id)
            deadline = time.monotonic() + 120
            while True:
                page.goto(f"{base}/task/{running_task}")
                body = page.inner_text("body")
                if "step " in body and "/150" in body:
                    break
                assert time.monotonic() < deadline, body[:3000]
                time.sleep(1)
            page.screenshot(path=str(artifacts / "running-task.png"), full_page=True)
            assert "a slow green square" in body  # what the task renders, not a list of ids
            browser.close()
        slow.cancel()
    finally:
        flower.terminate()
        flower.wait(timeout=30)
        env.stop_workers()


def _flower_task(port: int, task_id: str, timeout: float = 30) -> dict:
    """Flower's own record of a task (its API, with the basic-auth login)."""
    import base64
    import json

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/task/info/{task_id}",
        headers={"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _task_id(farm, submission_id: str) -> str:
    from sqlalchemy import select

    from farm.db.tables import ImageRecord

    with farm.sessions() as session:
        return session.scalars(select(ImageRecord.task_id).where(ImageRecord.submission_id == submission_id)).first()

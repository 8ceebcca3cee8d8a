"""`farm api` end to end: the real A1111 client (webuiapi, unchanged) against the API run as its own
process (the `farm api` command), a real CPU worker, PostgreSQL, Redis and S3 (moto)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

CLI = "import sys; from farm.cli.api import {name}; {name}(sys.argv[1:], prog_name='farm')"


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_key(env, name: str, *options: str) -> tuple[str, str]:
    """``farm api-key create``: (key, webhook secret)."""
    made = subprocess.run([sys.executable, "-c", CLI.format(name="api_key"), "create", "--name", name, *options],
                          env=env.process_env(), capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    lines = made.stdout.strip().splitlines()
    return lines[-1], lines[0].rpartition("webhook secret: ")[2]


@pytest.fixture(scope="module")
def served(make_farm_env):
    env = make_farm_env(
        "servers", FARM_LIMITS__MAX_NUM_IMAGES="4", FARM_LIMITS__MAX_STEPS="8", FARM_LIMITS__MAX_SIZE="128",
        FARM_API_WEBHOOK_INTERVAL="0.2", FARM_API_WEBHOOK_BACKOFF="0.2", FARM_API_POLL_INTERVAL="0.1",
        FARM_API_SYNC_TIMEOUT="120",
    )
    env.start_worker("api")
    keys = {name: _make_key(env, name, *options) for name, options in {
        "alice": (), "bob": (), "fuzz": (), "slow": ("--rate", "1/s"), "single": ("--concurrency", "1"),
    }.items()}
    port = _port()
    log_path = env.tmp / "api.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", CLI.format(name="api"), "--port", str(port)],
                                   env=env.process_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(log_path.read_text(errors="replace"))
            time.sleep(0.2)
    try:
        yield env, base, port, keys, log_path
    finally:
        process.terminate()
        process.wait(timeout=30)
        log = log_path.read_text(errors="replace")
        for key, _ in keys.values():
            assert key not in log, "an API key was logged"


def _client(port: int, key: str):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=4)
    api.set_auth("farm", key)
    return api


def _call(base: str, key: str, method: str, path: str, body=None):
    request = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.headers, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read() or b"null")


def test_webuiapi_txt2img_img2img_models_and_png_info(served) -> None:
    env, base, port, keys, _ = served
    api = _client(port, keys["alice"][0])
    assert "tiny" in api.util_get_model_names()
    api.util_set_model("tiny")
    assert api.get_options()["sd_model_checkpoint"] == "tiny"
    assert "DPM++ 2M Karras" in api.util_get_sampler_names()

    result = api.txt2img(prompt="a red cube", negative_prompt="blurry", seed=5, steps=4, cfg_scale=7, width=64,
                         height=64, batch_size=2, sampler_name="DPM++ 2M Karras")
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [5, 6] and result.info["sd_model_name"] == "tiny"
    assert len(result.info["infotexts"]) == 2 and "Seed: 5" in result.info["infotexts"][0]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in result.images[0].info["parameters"]
    assert result.parameters["prompt"] == "a red cube"

    info = api.png_info(result.image)
    assert "Seed: 5" in info.info and info.json["parameters"]["Seed"] == "5"

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    edited = api.img2img(images=[result.image], mask_image=mask, prompt="a green cube", seed=9, steps=4,
                         denoising_strength=0.6, width=64, height=64, mask_blur=2)
    assert edited.image.size == (64, 64) and edited.info["all_seeds"] == [9]
    assert edited.info["is_using_inpainting_conditioning"] is True
    assert "Denoising strength: 0.6" in edited.image.info["parameters"] and "Mask blur: 2" in edited.image.info["parameters"]
    # keys see only their own jobs
    job_id = edited.info["farm"]["job_id"]
    assert _call(base, keys["alice"][0], "GET", f"/v1/jobs/{job_id}")[0] == 200
    assert _call(base, keys["bob"][0], "GET", f"/v1/jobs/{job_id}")[0] == 404
    with pytest.raises(RuntimeError) as refused:
        _client(port, keys["bob"][0]).txt2img(prompt="x", enable_hr=True, width=64, height=64)
    assert "422" in str(refused.value) and "enable_hr" in str(refused.value)


def test_rate_and_concurrency_limits(served) -> None:
    env, base, port, keys, _ = served
    slow = keys["slow"][0]
    answers = [_call(base, slow, "GET", "/sdapi/v1/samplers") for _ in range(3)]
    assert answers[0][0] == 200 and 429 in [a[0] for a in answers]
    assert int(next(a for a in answers if a[0] == 429)[1]["Retry-After"]) >= 1
    single = keys["single"][0]
    job = {"prompt": "a cube", "steps": 8, "width": 128, "height": 128, "batch_size": 4, "seed": 1}
    first = _call(base, single, "POST", "/agent-scheduler/v1/queue/txt2img", job)
    assert first[0] == 200, first
    second = _call(base, single, "POST", "/agent-scheduler/v1/queue/txt2img", job)
    assert second[0] == 429 and second[1]["Retry-After"] == "1"
    assert _call(base, single, "POST", "/sdapi/v1/interrupt")[2]["canceled_images"] >= 1


def test_queued_jobs_results_and_signed_webhooks(served) -> None:
    env, base, port, keys, _ = served
    key, secret = keys["alice"]
    received: list[tuple[dict, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(500 if len(received) == 1 else 200)  # the first delivery fails: retried
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        status, _, created = _call(base, key, "POST", "/v1/jobs", {
            "prompt": "a blue cube", "steps": 4, "width": 64, "height": 64, "seed": 3,
            "callback_url": f"http://127.0.0.1:{receiver.server_port}/hook",
        })
        assert status == 201, created
        queued = _call(base, key, "POST", "/agent-scheduler/v1/queue/txt2img",
                       {"prompt": "a cube", "steps": 4, "width": 64, "height": 64, "seed": 4})[2]["task_id"]
        deadline = time.monotonic() + 120
        while len(received) < 2 or _call(base, key, "GET", f"/agent-scheduler/v1/results/{queued}")[2]["success"] is False:
            assert time.monotonic() < deadline, (received, _call(base, key, "GET", f"/v1/jobs/{created['id']}"))
            time.sleep(0.3)
        results = _call(base, key, "GET", f"/agent-scheduler/v1/results/{queued}")[2]
        assert "Seed: 4" in results["data"][0]["infotext"]
        view = _call(base, key, "GET", f"/v1/jobs/{created['id']}")[2]
        assert view["status"] == "succeeded" and view["images"][0]["progress"] == 1.0
        image = urllib.request.urlopen(urllib.request.Request(
            base + view["images"][0]["url"], headers={"Authorization": f"Bearer {key}"})).read()
        assert Image.open(io.BytesIO(image)).size == (64, 64)
        for headers, body in received:
            signed = headers["X-Farm-Timestamp"].encode() + b"." + body
            assert headers["X-Farm-Signature"] == "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
            assert headers["X-Farm-Idempotency-Key"] == f"{created['id']}:finished"
        assert [h["X-Farm-Attempt"] for h, _ in received] == ["1", "2"]
        assert json.loads(received[1][1])["job"]["status"] == "succeeded"
        time.sleep(1)
        assert len(received) == 2 and view["webhook"] is not None
        assert _call(base, key, "GET", f"/v1/jobs/{created['id']}")[2]["webhook"]["state"] == "delivered"
    finally:
        receiver.shutdown()


def test_a_campaign_upload_renders_on_the_worker_and_exports(served) -> None:
    import tarfile

    import requests

    env, base, port, keys, _ = served
    alice, bob = ({"Authorization": f"Bearer {keys[name][0]}"} for name in ("alice", "bob"))
    csv = b"id,prompt,steps,width,height\nr1,a red circle on a blue background,2,64,64\n"
    created = requests.post(base + "/v1/campaigns", headers=alice, data={"name": "api-campaign", "sweep": ["seed=1,2"]},
                            files={"file": ("prompts.csv", csv, "text/csv")}, timeout=120)
    assert created.status_code == 201, created.text
    campaign_id = created.json()["id"]
    assert created.json()["new"] == 2
    assert requests.get(f"{base}/v1/campaigns/{campaign_id}", headers=bob, timeout=30).status_code == 404
    bad = requests.post(base + "/v1/campaigns", headers=alice, data={"name": "api-campaign-bad"},
                        files={"file": ("prompts.csv", csv.replace(b",64,64", b",65,64"), "text/csv")}, timeout=60)
    assert bad.status_code == 422 and "prompts.csv line 2: width=65 is invalid" in bad.json()["detail"], bad.text
    deadline = time.monotonic() + 120
    while (status := requests.get(f"{base}/v1/campaigns/api-campaign", headers=alice, timeout=30).json())["finished"] < 2:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["counts"]["succeeded"] == 2 and status["state"] == "finished", status
    assert [c["name"] for c in requests.get(base + "/v1/campaigns", headers=alice, timeout=30).json()["campaigns"]] == ["api-campaign"]

    exported = requests.get(base + status["export_url"], headers=alice, timeout=120)
    assert exported.status_code == 200 and exported.headers["X-Farm-Exported"] == "2"
    with tarfile.open(fileobj=io.BytesIO(exported.content)) as tar:
        meta = [json.loads(line) for line in tar.extractfile("train/metadata.jsonl").read().splitlines()]
        assert sorted(m["seed"] for m in meta) == [1, 2]
        assert Image.open(tar.extractfile("train/" + meta[0]["file_name"])).size == (64, 64)
    # S3 storage: the manifest's URLs are presigned, fetched without the key
    lines = [json.loads(line) for line in requests.get(base + status["manifest_url"], headers=alice, timeout=60).text.splitlines()]
    assert len(lines) == 2 and ("Signature=" in lines[0]["url"] or "X-Amz-Signature=" in lines[0]["url"]), lines[0]["url"]
    png = requests.get(lines[0]["url"], timeout=30)
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 64)


def test_schemathesis_finds_no_server_error(served) -> None:
    env, base, port, keys, _ = served
    started = time.monotonic()
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "30", "-H", f"Authorization: Bearer {keys['fuzz'][0]}", "--request-timeout", "60",
         "--generation-deterministic", "--phases", "examples,fuzzing", "-w", "1",
         "--exclude-path-regex", "interrupt"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "NO_COLOR": "1"},
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    import re

    generated = int(re.search(r"(\d+) generated", run.stdout).group(1))
    assert generated >= 300, run.stdout[-3000:]
    print(f"schemathesis: {generated} cases in {elapsed:.1f} s")
